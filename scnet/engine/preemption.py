"""Stopping a run cleanly when the scheduler asks: the signals of ``train.stop_signals`` (SIGTERM, what
schedulers send before they kill a job, and SIGUSR1, what SLURM's ``--signal`` sends ahead of the time
limit) make training write a checkpoint at the next iteration boundary and exit, every process at the
same iteration, so that ``--resume auto`` continues exactly where it stopped.

The handler only records the signal; the loop asks at each iteration boundary, and the processes agree
through one collective (a signal that reached one process stops all). Data-loader workers ignore these
signals: the main process ends them when it exits, and a worker killed mid-batch would otherwise
abort the step the checkpoint is waiting for.
"""
import signal

import torch

from . import dist


class StopRequested(Exception):
    """Raised by the training loop once the checkpoint of a requested stop is written."""

    def __init__(self, signal_name, iteration, exit_code):
        super().__init__(f"stopped by {signal_name} after iteration {iteration}")
        self.signal_name, self.iteration, self.exit_code = signal_name, iteration, exit_code


def parse_signals(names):
    """Signal numbers of names such as "SIGTERM"; ValueError naming ``train.stop_signals`` otherwise."""
    numbers = []
    for name in names:
        number = getattr(signal, str(name), None)
        if not isinstance(number, signal.Signals) or number in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"train.stop_signals: {name!r} is not a signal a process can catch (e.g. SIGTERM)")
        numbers.append(number)
    return numbers


class StopSignals:
    """Context manager: while active, the signals are recorded instead of ending the process."""

    def __init__(self, numbers):
        self.numbers, self.received, self._previous = list(numbers), None, {}

    def __enter__(self):
        for number in self.numbers:
            self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _record(self, number, frame):
        self.received = self.received or signal.Signals(number)

    def agreed(self, device):
        """Collective: the signal received by any process (the highest number if several), else None;
        the same answer on every process."""
        number = int(self.received or 0)
        if dist.is_distributed():
            t = torch.tensor(number, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            number = int(t.item())
        return signal.Signals(number) if number else None
