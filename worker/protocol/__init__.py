"""The exactly-once protocol: ``process`` for one event (single.py), ``process_batch`` for many
in one transaction (batch.py). Nothing else applies effects. The guarantee, its steps and its
assumptions are in single.py's docstring."""

from worker.protocol.batch import BatchOutcome, HandBackReason, HandedBack, process_batch
from worker.protocol.single import Config, Outcome, Refusal, admit, process, with_db_retries

__all__ = [
    "BatchOutcome",
    "Config",
    "HandBackReason",
    "HandedBack",
    "Outcome",
    "Refusal",
    "admit",
    "process",
    "process_batch",
    "with_db_retries",
]
