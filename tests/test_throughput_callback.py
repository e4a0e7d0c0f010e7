"""RolloutThroughput logs sampler sync time and judge parse failures when they exist."""

from types import SimpleNamespace

from ppg.callbacks.throughput import RolloutThroughput


class _Module:
    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


class _CountingJudge:
    parse_failures = 3


def test_logs_sync_seconds_and_judge_parse_failures():
    module = _Module()
    datamodule = SimpleNamespace(last_stats=None, last_sync_s=1.25, judge=_CountingJudge())
    RolloutThroughput().on_train_epoch_start(SimpleNamespace(datamodule=datamodule), module)
    assert module.logged == {"sampler/sync_s": 1.25, "judge/parse_failures": 3.0}


def test_judges_without_a_counter_log_nothing():
    module = _Module()
    datamodule = SimpleNamespace(last_stats=None, last_sync_s=None, judge=object())
    RolloutThroughput().on_train_epoch_start(SimpleNamespace(datamodule=datamodule), module)
    assert module.logged == {}
