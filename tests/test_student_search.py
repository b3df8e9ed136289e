"""The validation search's result file (scripts/student_search.py): a search of new candidates
keeps the rows an earlier search of the same setting and role wrote."""

import json

from scripts import student_search as ss


def _row(layers, lr, gain):
    return {
        "lora_layers": layers,
        "lr": lr,
        "epochs": 2.0,
        "n_train": 400,
        "n_validation": 200,
        "acc_gain": gain,
    }


def test_earlier_candidates_are_kept_and_a_rerun_replaces_its_own_row(tmp_path):
    out = tmp_path / "search.json"
    assert ss._earlier_rows(out, "boolq", "teacher") == []
    out.write_text(
        json.dumps(
            {
                "setting": "boolq",
                "role": "teacher",
                "candidates": [_row(8, 3e-4, 0.05), _row(28, 1e-4, 0.01)],
            }
        )
    )
    rows = ss._earlier_rows(out, "boolq", "teacher")
    assert [r["lora_layers"] for r in rows] == [8, 28]
    assert ss._earlier_rows(out, "csqa", "teacher") == []  # another setting's file
    assert ss._earlier_rows(out, "boolq", "student") == []  # another role's
    again = _row(28, 1e-4, 0.07)
    merged = ss._merged(rows, again)
    assert [(r["lora_layers"], r["acc_gain"]) for r in merged] == [(8, 0.05), (28, 0.07)]
    out.write_text("{")  # a torn file is not a reason to stop a search
    assert ss._earlier_rows(out, "boolq", "teacher") == []
