from autosplit.search.early_stop import Finished, should_stop
from autosplit.search.space import EarlyStopping

RULE = EarlyStopping(enabled=True, after_epoch=1, margin=2.0, flops_tolerance=0.05, min_trials=2)
FINISHED = [Finished(flops=1_000_000, curve=[80.0, 85.0, 88.0]),
            Finished(flops=3_000_000, curve=[84.0, 89.0, 91.0])]


def stop(**kw):
    args = {"epoch": 1, "val_acc": 70.0, "flops": 1_000_000, "finished": FINISHED,
            "total_epochs": 3} | kw
    return should_stop(RULE, **args)


def test_a_trial_dominated_at_the_same_epoch_is_stopped():
    assert stop(val_acc=77.0)  # a trial as cheap was 80 after epoch 1: 3 points better


def test_within_the_margin_or_cheaper_than_everyone_goes_on():
    assert not stop(val_acc=78.5)  # only 1.5 points behind
    assert not stop(val_acc=50.0, flops=500_000)  # cheaper than every finished trial
    assert stop(val_acc=50.0, flops=1_040_000)  # within the 5 % FLOPs tolerance


def test_compares_at_equal_epochs_not_final_accuracy():
    # 86 after epoch 2 beats the cheap trial's 85 at epoch 2, though below its final 88.
    assert not stop(epoch=2, val_acc=86.0)
    assert stop(epoch=2, val_acc=82.0)


def test_never_before_after_epoch_nor_at_the_last_epoch_nor_without_enough_trials():
    late = EarlyStopping(after_epoch=2, margin=2.0, min_trials=2)
    assert not should_stop(late, epoch=1, val_acc=0.0, flops=10**6, finished=FINISHED, total_epochs=3)
    assert not stop(epoch=3, val_acc=0.0)  # the trial is done anyway
    assert not stop(val_acc=0.0, finished=FINISHED[:1])  # min_trials not reached
    off = EarlyStopping(enabled=False)
    assert not should_stop(off, epoch=1, val_acc=0.0, flops=10**6, finished=FINISHED, total_epochs=3)
