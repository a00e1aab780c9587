"""The memory budget of a merge: ``--max-memory`` or, without it, the automatic budget."""

from __future__ import annotations

import pytest
import yaml

from mergecore import budget
from mergecore.io import open_checkpoint
from mergecore.units import human_bytes

GIB = 1 << 30


def test_auto_budget_holds_three_of_the_largest_tensor_within_its_bounds():
    assert budget.auto_budget(10 << 20, 64 * GIB) == budget.AUTO_MIN  # small models: the floor
    assert budget.auto_budget(2 * GIB, 64 * GIB) == 6 * GIB  # three items
    assert budget.auto_budget(2 * GIB, None) == 6 * GIB  # availability unknown: no cap
    assert budget.auto_budget(2 * GIB, 8 * GIB) == 4 * GIB  # at most half the available
    assert budget.auto_budget(2 * GIB, 1 * GIB) == budget.AUTO_MIN  # never below the floor


def test_available_memory_is_a_plausible_size():
    found = budget.available_memory()
    assert found is None or 16 << 20 < found < 1 << 50


def test_a_zero_budget_is_refused():
    with pytest.raises(ValueError):
        budget.ByteBudget(0)


def _linear_config(tmp_path, family):
    cfg = tmp_path / "linear.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": family[1], "parameters": {"weight": 0.6}},
                   {"model": family[2], "parameters": {"weight": 0.4}}]}))
    return cfg


def test_a_merge_without_max_memory_gets_three_of_its_largest_tensor(small_family, tmp_path,
                                                                     monkeypatch):
    """Each output tensor of a two-model bf16 linear merge holds its two inputs and its output
    (3 x its bytes) while in flight; the automatic budget is three of the largest such."""
    from mergecore.merge import MergeOptions, run_merge

    monkeypatch.setattr(budget, "AUTO_MIN", 1)  # the small family is far under the floor
    largest = max(info.nbytes for info in open_checkpoint(small_family[1]).tensors.values())
    result = run_merge(_linear_config(tmp_path, small_family), tmp_path / "out",
                       MergeOptions(quiet=True))
    stats = result.stats
    want = budget.auto_budget(3 * largest, budget.available_memory())
    assert stats.budget_bytes == want == 9 * largest
    assert 0 < stats.peak_budget_bytes <= stats.budget_bytes


def test_an_explicit_max_memory_is_the_budget(small_family, tmp_path):
    from mergecore.merge import MergeOptions, run_merge

    result = run_merge(_linear_config(tmp_path, small_family), tmp_path / "out",
                       MergeOptions(quiet=True, max_memory=3 << 20))
    assert result.stats.budget_bytes == 3 << 20
    assert result.stats.peak_budget_bytes <= 3 << 20


def test_dry_run_states_the_budget_the_merge_would_use(small_family, tmp_path, capsys,
                                                       monkeypatch):
    from mergecore.cli import main

    monkeypatch.setattr(budget, "AUTO_MIN", 1)
    largest = max(info.nbytes for info in open_checkpoint(small_family[1]).tensors.values())
    cfg = _linear_config(tmp_path, small_family)
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("memory budget")]
    want = (f"memory budget: {human_bytes(9 * largest)} (automatic: three of the largest "
            "tensor's inputs and output, at least 2 GiB, at most half the available memory); "
            f"the largest tensor holds {human_bytes(3 * largest)} in flight")
    assert line == [want]
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dry-run",
                 "--max-memory", "5MiB"]) == 0
    assert "memory budget: 5.0 MiB (--max-memory)" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
