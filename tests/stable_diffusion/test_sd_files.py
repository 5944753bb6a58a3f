"""The prompt lists of the Stable Diffusion job (``siss.stable_diffusion.files``): plain text,
JSONL (Wen et al.'s ``sdv1_500_memorized.jsonl`` included) and Webster's ground-truth parquet,
each prompt a job in a subfolder of ``--out``."""

from __future__ import annotations

import json

import pytest

from siss.stable_diffusion.files import MEMORIZED_TYPES, read_prompt_list, records_from_columns


def test_prompt_list_formats(tmp_path):
    (tmp_path / "list.txt").write_text("# memorized prompts\nfirst prompt\n\nsecond prompt\n")
    jobs = read_prompt_list(tmp_path / "list.txt", tmp_path / "out")
    assert [j.prompt for j in jobs] == ["first prompt", "second prompt"]
    assert [j.out.name for j in jobs] == ["000-first-prompt", "001-second-prompt"]

    (tmp_path / "ref.png").write_bytes(b"")
    rows = [
        {"prompt": "a", "train_prompt": "a'", "reference_image": "ref.png"},
        # Wen et al.'s sdv1_500_memorized.jsonl: caption, index, url
        {"caption": "Mothers influence on her young hippo", "index": 964841345, "url": "https://x"},
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second = read_prompt_list(tmp_path / "list.jsonl", tmp_path / "out")
    assert (first.prompt, first.train_prompt) == ("a", "a'")
    assert first.reference == (tmp_path / "ref.png").resolve()
    assert (second.prompt, second.train_prompt) == ("Mothers influence on her young hippo",) * 2
    assert second.source == {"index": 964841345, "url": "https://x"}

    (tmp_path / "bad.jsonl").write_text('{"url": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"--prompts .* entry 1: no 'prompt'"):
        read_prompt_list(tmp_path / "bad.jsonl", tmp_path / "out")
    (tmp_path / "missing.jsonl").write_text('{"prompt": "a", "reference_image": "nope.png"}\n')
    with pytest.raises(ValueError, match="no reference image"):
        read_prompt_list(tmp_path / "missing.jsonl", tmp_path / "out")


def test_webster_columns_keep_memorized_rows_only():
    """Webster's ground-truth parquet, as pyarrow's ``to_pydict()`` gives it."""
    columns = {
        "caption": ["Galaxy Women's Leather Boots", "Mothers influence on her young hippo", "x"],
        "url": ["u1", "u2", "u3"],
        "overfit_type": ["TV", "MV", "N"],
    }
    rows = records_from_columns(columns, "gt.parquet", MEMORIZED_TYPES)
    assert [r["caption"] for r in rows] == columns["caption"][:2]
    rows = records_from_columns(columns, "gt.parquet", ["MV"])
    assert [r["overfit_type"] for r in rows] == ["MV"]
    with pytest.raises(ValueError, match="no 'caption' or 'prompt' column"):
        records_from_columns({"text": ["a"]}, "gt.parquet", ["MV"])


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "gt.parquet").write_bytes(b"PAR1")
        with pytest.raises(SystemExit, match="pip install pyarrow"):
            read_prompt_list(tmp_path / "gt.parquet", tmp_path / "out")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"caption": ["a", "b"], "url": ["u", "v"], "overfit_type": ["MV", "N"]})
        pq.write_table(table, tmp_path / "gt.parquet")
        jobs = read_prompt_list(tmp_path / "gt.parquet", tmp_path / "out")
        assert [j.prompt for j in jobs] == ["a"]


def test_checkpoints_leave_no_half_written_or_empty_folder_behind(tmp_path):
    """A save killed before its rename leaves ``checkpoints/.tmp-step-...``: the next save removes
    it (resuming never reads it); removing every checkpoint removes their folder too."""
    from types import SimpleNamespace

    from siss.stable_diffusion.files import checkpoints, remove_checkpoints, save_checkpoint

    def save_state(path, safe_serialization):
        (tmp_path / "saved").write_text(path)

    accelerator = SimpleNamespace(
        is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state
    )
    killed = tmp_path / "checkpoints" / ".tmp-step-000005"
    killed.mkdir(parents=True)
    assert checkpoints(tmp_path) == []
    save_checkpoint(accelerator, tmp_path, 10, {"step": 10})
    assert not killed.exists()
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000010"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000010"]
    remove_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    (tmp_path / "list.txt").write_text("\ufeffa photo of a tshirt\nsecond\n", encoding="utf-8")
    (tmp_path / "list.jsonl").write_text('\ufeff{"prompt": "a photo"}\n', encoding="utf-8")
    assert read_prompt_list(tmp_path / "list.txt", tmp_path)[0].prompt == "a photo of a tshirt"
    assert read_prompt_list(tmp_path / "list.jsonl", tmp_path)[0].prompt == "a photo"
