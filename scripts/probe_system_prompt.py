"""Does the chat template's default system prompt change accuracy or calibration? (issue 17)

Evaluates the untuned Qwen2.5-Coder teacher and student on N questions of our CSQA and BoolQ
validation splits (10% of the training split, never a test set) in the `chat` style (the
template's default system turn, Qwen2.5's "You are Qwen, created by Alibaba Cloud. You are a
helpful assistant.") and the `chat-nosys` style (an empty system turn), and reports the paired
difference (chat-nosys minus chat) in accuracy and ECE with 95% bootstrap intervals over the
questions, and the tokens each style costs.

    python -m scripts.probe_system_prompt --n 300 --out bench/system-prompt-probe.json
"""

from __future__ import annotations

import argparse
import json
import time

from first_lib import book, device, evaluate, models, tasks

MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
STYLES = ("chat", "chat-nosys")


def probe(task: str, name: str, n: int, precision: str, max_length: int) -> dict:
    questions = tasks.subset(tasks.load_task(task, "validation"), n, 0)
    model = models.load_model(name, dtype=device.torch_dtype(precision), device="cpu")
    tok = models.load_tokenizer(name)
    records, out = {}, {"task": task, "model": name, "n": len(questions)}
    for style in STYLES:
        t0 = time.perf_counter()
        records[style] = evaluate.evaluate_multiple_choice(
            model, tok, questions, style=style, batch_size=8, progress=False, max_length=max_length
        )
        conf, correct = book.conf_correct(records[style])
        prompts = [tasks.render_prompt(q, tok, style) for q in questions]
        out[style] = {
            "acc": round(float(correct.mean()), 4),
            "ece": round(book.metric_value("ece", conf, correct), 4),
            "tokens": sum(len(tasks.encode(tok, p, style)) for p in prompts),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    for metric in ("acc", "ece"):
        d = book.paired_difference(records["chat-nosys"], records["chat"], metric, n_boot=2000)
        out[f"{metric}_nosys_minus_chat"] = [round(d.point, 4), round(d.lo, 4), round(d.hi, 4)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="validation questions per task")
    p.add_argument("--tasks", default="csqa,boolq")
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--out", default="bench/system-prompt-probe.json")
    args = p.parse_args(argv)
    precision = device.resolve_precision(None)
    rows = []
    for task in args.tasks.split(","):
        for name in MODELS:
            rows.append(probe(task, name, args.n, precision, args.max_length))
            print(json.dumps(rows[-1]), flush=True)
    info = device.info()
    result = {"precision": precision, "machine": info, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
