from setuptools import find_packages, setup

setup(
    name="scnet",
    version="0.1.0",
    description="SCNet (AAAI 2021) instance segmentation in plain PyTorch",
    packages=find_packages(include=["scnet", "scnet.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.5",  # public state-dict hooks (detector.py)
        "torchvision>=0.20",
        "pycocotools",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",  # the charts of scripts/analyze.py and scripts/iou_distribution.py
    ],
    extras_require={
        "test": ["pytest"],
        "export": ["onnx", "onnxscript", "onnxruntime"],  # scripts/export.py --format onnx, deploy/scnet_runtime.py
    },
)
