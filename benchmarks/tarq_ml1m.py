"""TARQ on MovieLens-1M: TARQ vs Two-Tower, the target-attention teacher TARQ approximates, and
codebook utilisation / code entropy per level with and without codebook alignment.

    PYTHONPATH=src nice -n 5 python benchmarks/tarq_ml1m.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz --protocol temporal \
        --epochs 3 --patience 1 --out benchmarks/results/ml1m_tarq

Resumable: each finished run is stored in OUT/results-<protocol>-seed<seed>.json and skipped when
the script is started again. Writes OUT/summary.md (all result files in OUT) and
OUT/utilisation.png (utilisation per level, with vs without alignment). Per-request cost is
`benchmarks/tarq_cost.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from prerank.data.movielens import load_movielens
from prerank.data.pipeline import ProtocolConfig
from prerank.data.table import ITEM_ROW, LABEL
from prerank.metrics import auc, logloss
from prerank.models.tarq import codebook_usage
from prerank.train.run import train_and_evaluate, write_json_atomic
from prerank.train.trainer import TrainConfig, iterate_batches, model_columns, to_device_tensors

# name -> (model, overrides). "(PR #1 codebooks)" reproduces the first version's codebook training:
# gradient-only codebooks, no codebook / commitment term, no restarts, the MLP teacher.
VARIANTS = {
    "two_tower": ("two_tower", {}),
    "tarq": ("tarq", {}),
    "tarq (no alignment)": ("tarq", {"align": False}),
    "tarq (normalised alignment)": ("tarq", {"align_normalise": True}),
    "tarq (codebook loss)": ("tarq", {"codebook_update": "loss"}),
    "tarq (codebook loss, no alignment)": ("tarq", {"codebook_update": "loss", "align": False}),
    "tarq (first version's codebooks)": ("tarq", {"codebook_update": "loss", "codebook_weight": 0.0, "commitment_weight": 0.0,
                                                  "dead_code_restart": False}),
    "tarq (first version's codebooks, no alignment)": ("tarq", {"codebook_update": "loss", "codebook_weight": 0.0,
                                                                "commitment_weight": 0.0, "dead_code_restart": False, "align": False}),
    "tarq (first version's codebooks, normalised alignment)": ("tarq", {"codebook_update": "loss", "codebook_weight": 0.0,
                                                                        "commitment_weight": 0.0, "dead_code_restart": False,
                                                                        "align_normalise": True}),
}


@torch.no_grad()
def teacher_report(model, table) -> dict:
    model.eval()
    tensors = to_device_tensors(table, model_columns(model), torch.device("cpu"))
    logits = torch.cat([model.teacher(batch)[1].reshape(-1) for batch in iterate_batches(tensors, 16384)])
    p = torch.sigmoid(logits).numpy()
    return {"auc": auc(table[LABEL], p), "logloss": logloss(table[LABEL], p)}


@torch.no_grad()
def usage_report(model, data, batch_size: int = 2048) -> dict:
    """Utilisation and entropy per level over the test rows' items (popularity-weighted, as a
    batch sees them), the mean over test batches of `batch_size` rows, over the catalogue, and the
    mean over the last 50 training batches."""
    model.eval()
    K = model.config.codebook_size
    catalogue = model.encode_catalogue(data.items.to_tensors())["codes"]
    rows = torch.as_tensor(data.test[ITEM_ROW]).long()
    codes = catalogue[rows]
    per_batch = [codebook_usage(codes[i : i + batch_size], K)["utilisation"] for i in range(0, len(codes), batch_size)]
    return {"evaluation_set": codebook_usage(codes, K), "per_batch_utilisation": np.mean(per_batch, axis=0).tolist(),
            "catalogue": codebook_usage(catalogue, K),
            "training_batches_utilisation": np.mean(model.batch_utilisation[-50:], axis=0).tolist()}


def summary(out: Path) -> None:
    lines = ["# TARQ on ML-1M (users 1–2999)", "",
             "Test split; one training per row (seed in the file name). Utilisation = distinct codes / K per level; "
             "'eval set' counts the codes of the test rows' items, 'per batch' averages over test batches of 2,048 rows, "
             "'train batches' over the last 50 training batches. Entropy in nats over the test rows (max ln 64 = 4.16).", "",
             "| protocol | seed | model | test AUC | test log loss | teacher test AUC | utilisation eval set | per batch | train batches | catalogue | entropy | align loss (last epoch) | s/epoch | epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    percent = lambda values: ", ".join(f"{v:.0%}" for v in values)  # noqa: E731
    for path in sorted(out.glob("results-*.json")):
        results = json.loads(path.read_text())
        for name, run in results["runs"].items():
            cells = [results["protocol"], str(results["seed"]), name, f"{run['test']['auc']:.4f}", f"{run['test']['logloss']:.4f}"]
            if "codebook" in run:
                usage = run["codebook"]
                cells += [f"{run['teacher_test']['auc']:.4f}", percent(usage["evaluation_set"]["utilisation"]),
                          percent(usage["per_batch_utilisation"]), percent(usage["training_batches_utilisation"]),
                          percent(usage["catalogue"]["utilisation"]), ", ".join(f"{e:.2f}" for e in usage["evaluation_set"]["entropy"])]
            else:
                cells += ["–"] * 6
            align = run["history"][-1]["aux_losses"].get("align") if run["history"] else None
            cells.append("–" if align is None else f"{align:.2g}")
            cells += [f"{run['seconds_per_epoch']:.0f}", f"{run['epochs_run']} (best {run['best_epoch']})"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Seconds per epoch were measured with 1 thread on a shared 2-core machine under load from other jobs: compare "
              "them only roughly.", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(out)


def _scheme_and_alignment(name: str) -> tuple[str, str]:
    """'tarq (codebook loss, no alignment)' -> ('codebook loss', 'no alignment')."""
    parts = [p.strip() for p in name[len("tarq"):].strip(" ()").split(",") if p.strip()]
    align = next((p for p in parts if "alignment" in p), "alignment (official)")
    scheme = ", ".join(p for p in parts if "alignment" not in p) or "EMA codebooks (default)"
    return scheme, align.replace("normalised alignment", "alignment (normalised)")


def plot(out: Path) -> None:
    """One panel per (protocol, seed, codebook scheme): utilisation per level over the test rows,
    with vs without alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list[float]]] = {}
    for results in (json.loads(p.read_text()) for p in sorted(out.glob("results-*.json"))):
        for name, run in results["runs"].items():
            if "codebook" in run:
                scheme, align = _scheme_and_alignment(name)
                panels.setdefault(f"{results['protocol']}, seed {results['seed']}\n{scheme}", {})[align] = \
                    run["codebook"]["evaluation_set"]["utilisation"]
    if not panels:
        return
    order = ["no alignment", "alignment (official)", "alignment (normalised)"]
    colours = dict(zip(order, ["tab:gray", "tab:blue", "tab:orange"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels.items()):
        present = [a for a in order if a in bars]
        width = 0.8 / len(present)
        for i, align in enumerate(present):
            values = bars[align]
            ax.bar(np.arange(len(values)) + i * width, [100 * v for v in values], width, label=align, color=colours[align])
        ax.set_xticks(np.arange(len(values)) + 0.4 - width / 2, [f"level {l + 1}" for l in range(len(values))])
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 105)
    axes[0][0].set_ylabel("codebook utilisation over test rows (%)")
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("TARQ codebook utilisation (K = 64), with vs without alignment — ML-1M (users 1–2999)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out / "utilisation.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--ratings-file", default=None)
    parser.add_argument("--protocol", default="temporal")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["two_tower", "tarq", "tarq (no alignment)"], choices=sorted(VARIANTS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        return summary(out)
    path = out / f"results-{args.protocol}-seed{args.seed}.json"
    data = load_movielens(args.data_dir, ProtocolConfig(name=args.protocol), args.ratings_file, args.cache_dir)
    results = json.loads(path.read_text()) if path.exists() else {"dataset": data.meta["dataset_label"], "protocol": args.protocol,
                                                                 "seed": args.seed, "epochs": args.epochs, "runs": {}}
    for name in args.variants:
        if name in results["runs"]:
            print(f"{name}: done, skipped", flush=True)
            continue
        model_name, overrides = VARIANTS[name]
        config = TrainConfig(epochs=args.epochs, patience=args.patience, seed=args.seed, num_threads=args.threads, progress=False)
        metrics, model = train_and_evaluate(data, model_name, config, overrides)
        run = {"model": model_name, "overrides": overrides, "test": metrics["test"], "valid": metrics["valid"],
               "seconds_per_epoch": metrics["seconds_per_epoch"], "best_epoch": metrics["best_epoch"],
               "epochs_run": metrics["epochs_run"], "history": metrics["history"]}
        if model_name == "tarq":
            run["teacher_test"] = teacher_report(model, data.test)
            run["codebook"] = usage_report(model, data)
        results["runs"][name] = run
        print(name, {k: run[k] for k in ("test", "seconds_per_epoch")}, run.get("teacher_test"), run.get("codebook"), flush=True)
        write_json_atomic(path, results)
    summary(out)


if __name__ == "__main__":
    main()
