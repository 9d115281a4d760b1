"""Helpers outside the detector's data path: drawing detections and charts (``visualize``), the CPU
memory allocator's settings (``malloc``)."""
