from __future__ import annotations

import torch

from autosplit.cache import LiveTeacher, teacher_outputs
from autosplit.loader import TensorLoader
from autosplit.models import create_model


def _teacher(splits):
    torch.manual_seed(0)
    return create_model("tiny", num_classes=10, in_channels=splits.info.in_channels).eval()


def _cache(model, splits, cpu, tmp_path, **kw):
    return teacher_outputs(
        model,
        splits.train,
        splits.info,
        cpu,
        taps=kw.pop("taps", ["stage1"]),
        teacher_key="t0",
        data_fingerprint=splits.fingerprint,
        split_name="train",
        cache_dir=tmp_path,
        **kw,
    )


def test_cached_outputs_equal_live_outputs_and_are_reused(digits_splits, cpu, tmp_path):
    model = _teacher(digits_splits)
    cached = _cache(model, digits_splits, cpu, tmp_path)
    assert not cached.hit and cached.path.is_file()
    assert set(cached.tensors[0]) == {"stage1", "logits"}
    assert cached.tensors[0]["logits"].shape[0] == len(digits_splits.train.labels)
    live = LiveTeacher(model, ["stage1", "logits"], cpu)
    loader = TensorLoader(
        digits_splits.train, digits_splits.info, batch_size=50, shuffle=True, augment=False, seed=3
    )
    loader.set_epoch(1)
    for batch in loader:
        want, got = live.outputs(batch), cached.outputs(batch)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)

    again = _cache(model, digits_splits, cpu, tmp_path)
    assert again.hit and again.path == cached.path
    assert cached.nbytes > 0


def test_augmented_views_match_what_the_loader_shows(digits_splits, cpu, tmp_path):
    model = _teacher(digits_splits)
    cached = _cache(model, digits_splits, cpu, tmp_path, augment=True, n_views=2, seed=5)
    assert cached.n_views == 2
    assert not torch.equal(cached.tensors[0]["logits"], cached.tensors[1]["logits"])
    live = LiveTeacher(model, ["logits"], cpu)
    loader = TensorLoader(
        digits_splits.train,
        digits_splits.info,
        batch_size=64,
        shuffle=True,
        augment=True,
        seed=5,
        n_views=2,
    )
    for epoch in (0, 1, 2):  # epoch 2 wraps to view 0
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        torch.testing.assert_close(
            cached.outputs(batch)["logits"], live.outputs(batch)["logits"], rtol=1e-5, atol=1e-5
        )


def test_fp16_features_halve_the_size_but_logits_stay_fp32(digits_splits, cpu, tmp_path):
    model = _teacher(digits_splits)
    full = _cache(model, digits_splits, cpu, tmp_path)
    half = _cache(model, digits_splits, cpu, tmp_path, fp16=True)
    assert half.path != full.path
    assert half.tensors[0]["stage1"].dtype == torch.float16
    assert half.tensors[0]["logits"].dtype == torch.float32
    assert half.nbytes < full.nbytes


def test_damaged_cache_file_is_rebuilt(digits_splits, cpu, tmp_path):
    model = _teacher(digits_splits)
    cached = _cache(model, digits_splits, cpu, tmp_path)
    cached.path.write_bytes(b"garbage")
    rebuilt = _cache(model, digits_splits, cpu, tmp_path)
    assert not rebuilt.hit
    torch.testing.assert_close(rebuilt.tensors[0]["logits"], cached.tensors[0]["logits"])


def test_the_planner_can_tell_a_cache_on_disk_from_one_to_build(digits_splits, cpu, tmp_path):
    from types import SimpleNamespace

    from autosplit.cache import teacher_cache_exists, teacher_cache_for

    teacher = SimpleNamespace(model=_teacher(digits_splits), key="t0")

    def candidate(rows):
        return SimpleNamespace(
            train=SimpleNamespace(max_train_samples=rows, seed=0),
            data=SimpleNamespace(augment=True),
        )

    assert not teacher_cache_exists(candidate(300), "t0", digits_splits, tmp_path, views=2)
    built = teacher_cache_for(
        candidate(300), teacher, digits_splits, cpu, tmp_path, views=2, taps={"stage1"}
    )
    assert not built.hit
    assert teacher_cache_exists(
        candidate(300), "t0", digits_splits, tmp_path, views=2, taps={"stage1"}
    )
    # Another row count, tap set, number of views or teacher is another cache.
    assert not teacher_cache_exists(
        candidate(400), "t0", digits_splits, tmp_path, views=2, taps={"stage1"}
    )
    assert not teacher_cache_exists(candidate(300), "t0", digits_splits, tmp_path, views=2)
    assert not teacher_cache_exists(
        candidate(300), "t0", digits_splits, tmp_path, views=3, taps={"stage1"}
    )
    assert not teacher_cache_exists(
        candidate(300), "t1", digits_splits, tmp_path, views=2, taps={"stage1"}
    )


def test_a_job_builds_only_the_views_its_passes_read_and_a_wider_cache_serves_it(
    digits_splits, cpu, tmp_path
):
    from types import SimpleNamespace

    from autosplit.cache import HeldTeacherCache, cache_views

    teacher = SimpleNamespace(model=_teacher(digits_splits), key="t0")

    def job(epochs, rows=300):
        return SimpleNamespace(
            train=SimpleNamespace(max_train_samples=rows, seed=0, epochs=epochs),
            data=SimpleNamespace(augment=True),
        )

    assert [cache_views(3, job(e)) for e in (1, 2, 3, 8)] == [1, 2, 3, 3]
    assert cache_views(3, job(1), passes=2) == 2  # IE-KD's auto-encoder passes read views too
    plain = SimpleNamespace(train=job(8).train, data=SimpleNamespace(augment=False))
    assert cache_views(3, plain) == 1

    held = HeldTeacherCache(teacher, digits_splits, cpu, tmp_path, views=3)
    one = held.get({"stage1"}, job(1))
    assert (one.n_views, held.builds, held.build_images) == (1, 1, 300)
    three = held.get({"stage1"}, job(3))  # more epochs than the held cache has views
    assert (three.n_views, held.builds, held.build_images) == (3, 2, 300 + 900)
    # The views a short job reads are the same images and outputs in either cache.
    for tap in ("stage1", "logits"):
        assert torch.equal(one.tensors[0][tap], three.tensors[0][tap])
    # Held in memory, the wider cache serves a shorter job; so does its file, in a new process.
    assert held.get({"stage1"}, job(2)) is three and held.builds == 2
    fresh = HeldTeacherCache(teacher, digits_splits, cpu, tmp_path, views=3)
    again = fresh.get({"stage1"}, job(2))
    assert again.hit and again.n_views == 3 and fresh.builds == 0


def test_cache_builds_are_timed_by_the_outputs_they_hold(digits_splits, cpu, tmp_path):
    """A job's cache is planned at what builds of the same outputs cost here: a feature map
    costs more to store than logits (FitNets' final caches took 1.5x their plan when read at
    the rate of every build together)."""
    from types import SimpleNamespace

    from autosplit.cache import HeldTeacherCache

    teacher = SimpleNamespace(model=_teacher(digits_splits), key="t0")
    job = SimpleNamespace(
        train=SimpleNamespace(max_train_samples=300, seed=0, epochs=1),
        data=SimpleNamespace(augment=False),
    )
    held = HeldTeacherCache(teacher, digits_splits, cpu, tmp_path, views=3)
    assert held.seconds_per_image(set()) is None  # nothing built yet
    held.get(set(), job)
    held.get({"stage1"}, job)
    assert held.builds == 2 and sorted(held.built) == [("logits",), ("logits", "stage1")]
    assert [images for _s, images in held.built.values()] == [300, 300]
    seconds, images = held.built[("logits", "stage1")]
    assert held.seconds_per_image({"stage1"}) == seconds / images
    assert held.seconds_per_image({"logits"}) == held.built[("logits",)][0] / 300
    # Outputs never built: every build's rate.
    assert held.seconds_per_image({"stage2"}) == held.build_seconds / 600
