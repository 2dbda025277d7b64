"""Pre-rankers on simulated cascade requests of MovieLens-1M: Recall@K / NDCG@K (K = 10, 50, 100)
against the real interactions and against the ranking teacher's top-K, beside pointwise test
AUC / log loss, for each (model, objective) variant.

    python benchmarks/ml1m_cascade.py --data-dir ../shared/data/ml-1m \
        --ratings-file ratings-partial-users0001-2999/ratings.dat.gz \
        --teacher runs/din/checkpoint.pt --cascade runs/cascade.parquet \
        --models two_tower:pointwise,two_tower:hybrid,ranktower:hybrid,ranktower:-distill,ranktower:-fine,ranktower:-coarse \
        --out benchmarks/results/ml1m_cascade

A variant is MODEL:OBJECTIVE with OBJECTIVE one of `pointwise` (the ordinary BCE trainer on the
sample table), `hybrid` (the hybrid loss on cascade lists) or `-distill` / `-fine` / `-coarse`
(the hybrid loss without that term) or `listnet` (graded softmax CE over the whole list alone). Any registered model works (e.g. `inttower:hybrid`).
LT-TTD variants are `lttd:joint@KD` / `lttd:disjoint@KD` (its own losses, mode joint or disjoint,
lambda_KD = KD; `lttd:joint-noattn@KD` without attention across the list); they add the two-level view (`prerank.train.two_stage`): Recall@k of the
two-tower stage (k = `--two-tower-k`), the final list of the pipeline, latency and UPQE, which
the listwise variants of other models get too (as one-stage pre-rankers). With `--lttd-plot`
the script also plots two-tower-stage recall against lambda_KD, joint vs disjoint.
`--checkpoint two_tower=runs/tt/checkpoint.pt` evaluates an existing pointwise run instead of
training one. `--teacher` is a `prerank train --model din` checkpoint; `--cascade` is built from it (with the
default `CascadeConfig`) when the file does not exist. Each variant is written to OUT/runs/ as it
finishes and skipped when run again. Writes OUT/results.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prerank.cascade import CascadeConfig, build_cascade, load_cascade, save_cascade
from prerank.data.movielens import load_movielens
from prerank.data.pipeline import ProtocolConfig
from prerank.models.base import config_to_dict, create_model
from prerank.models.checkpoint import load_checkpoint
from prerank.train.listwise import ListwiseTrainer, list_report, score_lists
from prerank.train.losses import HybridLossConfig
from prerank.atomic import write_json_atomic
from prerank.train.two_stage import single_stage_report, two_stage_report
from prerank.train.trainer import Trainer, TrainConfig, evaluate

ABLATIONS = {"hybrid": {}, "-distill": {"distill_weight": 0.0}, "-fine": {"fine_weight": 0.0}, "-coarse": {"coarse_weight": 0.0},
             # graded softmax CE over the whole list alone: the ranking loss LT-TTD's transformer gets
             "listnet": {"distill_weight": 0.0, "coarse_weight": 0.0, "fine_min_stage": 0}}
COLUMNS = ["ndcg@10", "ndcg@50", "ndcg@100", "recall@10", "recall@50", "recall@100",
           "teacher_ndcg@10", "teacher_recall@10", "teacher_recall@50", "teacher_recall@100"]


def run_lttd(variant: str, objective: str, data, cascade, args) -> dict:
    """LT-TTD, mode joint or disjoint at lambda_KD, through `run_training` (which picks the mode)."""
    from prerank.train.run import train_and_evaluate

    mode, _, kd = objective.partition("@")
    mode, _, ablation = mode.partition("-")
    if mode not in ("joint", "disjoint") or ablation not in ("", "noattn"):
        raise SystemExit(f"unknown LT-TTD objective {objective!r} in {variant!r}; use joint@KD, disjoint@KD or joint-noattn@KD")
    overrides = {"mode": mode, "kd_weight": float(kd or 0.5), **({"list_attention": False} if ablation else {})}
    config = TrainConfig(epochs=args.epochs, patience=args.patience, seed=args.seed, batch_size=args.list_batch_size,
                         num_threads=args.threads, progress=True)
    metrics, model = train_and_evaluate(data, "lttd", config, overrides, cascade=cascade)
    if args.two_tower_k != 50:  # run_training reports the two-level view at k = 50
        metrics["test_two_stage"] = two_stage_report(model, data, cascade.lists("test"), args.two_tower_k)
    return {"variant": variant, "model": "lttd", "objective": objective, "loss_config": None, "model_overrides": overrides,
            "test_lists": metrics["test_lists"], "test_pointwise": metrics["test"], "test_two_stage": metrics["test_two_stage"],
            "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
            "seconds_per_epoch": metrics["seconds_per_epoch"], "num_parameters": metrics["num_parameters"],
            "model_config": metrics["model_config"], "history": metrics["history"]}


def run_variant(variant: str, data, cascade, args) -> dict:
    model_name, objective = variant.split(":", 1)
    if model_name == "lttd":
        return run_lttd(variant, objective, data, cascade, args)
    if objective != "pointwise" and objective not in ABLATIONS:
        raise SystemExit(f"unknown objective {objective!r} in {variant!r}; choose pointwise or {sorted(ABLATIONS)}")
    import torch

    torch.manual_seed(args.seed)
    if objective == "pointwise" and model_name in args.checkpoints:
        model, payload = load_checkpoint(Path(args.checkpoints[model_name]))
        return {"variant": variant, "model": model_name, "objective": objective, "loss_config": None,
                "checkpoint": args.checkpoints[model_name],
                "test_lists": list_report(score_lists(model, data, cascade.lists("test")), cascade.lists("test")),
                "test_pointwise": evaluate(model, data.test), "best_epoch": payload["extra"].get("epoch", 0),
                "epochs_run": payload["extra"].get("epoch", 0), "seconds_per_epoch": float("nan"),
                "num_parameters": model.num_parameters(), "model_config": payload["model_config"]}
    model = create_model(model_name, data.schema)
    if objective == "pointwise":
        trainer = Trainer(model, TrainConfig(epochs=args.epochs, patience=args.patience, seed=args.seed,
                                             num_threads=args.threads, progress=False))
        trainer.fit(data.train, data.valid)
        loss_config = None
    else:
        loss_config = HybridLossConfig(**ABLATIONS[objective])
        trainer = ListwiseTrainer(model, TrainConfig(epochs=args.epochs, patience=args.patience, seed=args.seed,
                                                     batch_size=args.list_batch_size, num_threads=args.threads,
                                                     progress=True), loss_config)
        trainer.fit_lists(data, cascade.lists("train"), cascade.lists("valid"))
    return {
        "variant": variant, "model": model_name, "objective": objective,
        "loss_config": loss_config.__dict__ if loss_config else None,
        "test_lists": list_report(score_lists(model, data, cascade.lists("test")), cascade.lists("test")),
        "test_two_stage": single_stage_report(model, data, cascade.lists("test"), args.two_tower_k),
        "test_pointwise": evaluate(model, data.test),
        "best_epoch": trainer.best_epoch, "epochs_run": len(trainer.history),
        "seconds_per_epoch": trainer.seconds_per_epoch, "num_parameters": model.num_parameters(),
        "model_config": config_to_dict(model.config), "history": [h.__dict__ for h in trainer.history],
    }


def summarise(results: list[dict], meta: dict) -> str:
    head = "| variant | " + " | ".join(COLUMNS) + " | test AUC | test log loss | epochs | s/epoch |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 5)]
    for r in results:
        lists, point = r["test_lists"], r["test_pointwise"]
        lines.append(f"| {r['variant']} | " + " | ".join(f"{lists[c]:.4f}" for c in COLUMNS)
                     + f" | {point['auc']:.4f} | {point['logloss']:.4f} | {r['epochs_run']} | {r['seconds_per_epoch']:.1f} |")
    return "\n".join(lines)


def summarise_two_level(results: list[dict], k: int) -> str:
    """The LT-TTD view: first-stage recall, final list, latency, UPQE (rows that have it)."""
    head = (f"| variant | first-stage Recall@{k} | first-stage NDCG@10 | final NDCG@10 | final Recall@10 | full-list NDCG@10 | "
            "full-list Recall@10 | latency ms/request | UPQE |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        t = r.get("test_two_stage")
        if not t:
            continue
        two_level = "tte_recall@" + str(k) in t
        first = t[f"tte_recall@{k}"] if two_level else t["full_list"][f"recall@{k}"]
        final_ndcg = t["pipeline_ndcg@10"] if two_level else t["full_list"]["ndcg@10"]
        final_recall = t["pipeline_recall@10"] if two_level else t["full_list"]["recall@10"]
        first_ndcg = t["tte_ndcg@10"] if two_level else t["full_list"]["ndcg@10"]
        lines.append(f"| {r['variant']} | {first:.4f} | {first_ndcg:.4f} | {final_ndcg:.4f} | {final_recall:.4f} | {t['full_list']['ndcg@10']:.4f} | "
                     f"{t['full_list']['recall@10']:.4f} | {t['upqe_latency_ms']:.2f} | {t['upqe']:.4f} |")
    return "\n".join(lines)


def latency_pass(results: list[dict], data, lists, k: int, rounds: int) -> dict[str, float]:
    """Per-request latency per architecture, measured in one pass, interleaved round by round
    (latency depends on the architecture, not the weights or the losses: one untrained model per
    distinct serving configuration, shared by the variants that only differ in training), median
    over rounds; each LT-TTD variant as its two-level pipeline. Rewrites every
    result's UPQE with its architecture's latency, so one busy moment does not decide a ranking."""
    import statistics

    from prerank.metrics import upqe_report
    from prerank.train.two_stage import request_latency_ms

    def architecture(r: dict) -> str:
        # Loss settings (mode, weights, temperatures of the losses) do not change the serving path.
        training_only = ("mode", "retrieval_weight", "rank_weight", "kd_weight", "kd_down_weight", "kd_up_weight",
                         "kd_temperature", "retrieval_negatives", "retrieval_min_relevance", "dropout")
        return json.dumps([r["model"], {k: v for k, v in r["model_config"].items() if k not in training_only}], sort_keys=True)

    models, times, arch_of = {}, {}, {}
    for r in results:
        if r.get("test_two_stage"):
            key = arch_of[r["variant"]] = architecture(r)
            if key not in models:
                models[key] = (create_model(r["model"], data.schema, r["model_config"]).eval(), k if r["model"] == "lttd" else None)
                times[key] = []
    for _ in range(rounds):
        for key, (model, two_stage_k) in models.items():
            times[key].append(request_latency_ms(model, data, lists, two_stage_k, requests=50, repeats=1))
    latency = {v: float(statistics.median(times[key])) for v, key in arch_of.items()}
    for r in results:
        t = r.get("test_two_stage")
        if t:
            two_level = f"tte_recall@{k}" in t
            t.update(upqe_report(t[f"tte_recall@{k}"] if two_level else t["full_list"][f"recall@{k}"],
                                 t["pipeline_ndcg@10"] if two_level else t["full_list"]["ndcg@10"],
                                 latency[r["variant"]], t["upqe_latency_ref_ms"]))
            t["upqe_latency_source"] = f"latency pass: median of {rounds} interleaved rounds, 50 requests each"
    return latency


def plot_kd_sweep(runs: dict[str, list[dict]], k: int, path: Path, label: str) -> None:
    """Two-tower-stage Recall@k against lambda_KD, joint vs disjoint; `runs` maps a seed's name to
    its results (several seeds: their points and the mean line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, colour, marker in (("joint", "C0", "o"), ("disjoint", "C1", "s")):
        by_kd: dict[float, list[float]] = {}
        for seed, results in runs.items():
            points = sorted((float(r["objective"].partition("@")[2] or 0.5), r["test_two_stage"][f"tte_recall@{k}"])
                            for r in results if r["model"] == "lttd" and r["objective"].partition("@")[0] == mode)
            for kd, recall in points:
                by_kd.setdefault(kd, []).append(recall)
            if points and len(runs) > 1:
                ax.scatter(*zip(*points), color=colour, marker=marker, alpha=0.45, s=22)
        # The line joins means over every seed; a lambda_KD that not every seed ran is a dot only.
        kds = sorted(x for x in by_kd if len(by_kd[x]) == len(runs))
        if len(runs) == 1 and by_kd or kds:
            ax.plot(kds, [sum(by_kd[x]) / len(by_kd[x]) for x in kds], marker=marker, color=colour,
                    label=f"LT-TTD {mode}" + (f" (line: mean of {len(runs)} seeds; dots: each seed)" if len(runs) > 1 else ""))
    ax.set_xlabel("λ_KD (distillation strength)")
    ax.set_ylabel(f"relevant items surviving the two-tower stage\n(Recall@{k} of the list)")
    ax.set_title(f"Two-tower stage recall vs λ_KD, {label}\n(note the narrow y range)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--ratings-file", default=None)
    parser.add_argument("--teacher", required=True, help="checkpoint of the ranking teacher (prerank train --model din)")
    parser.add_argument("--cascade", required=True, help="cascade parquet; built from the teacher if missing")
    parser.add_argument("--models", default="two_tower:pointwise,two_tower:hybrid,ranktower:hybrid,"
                                            "ranktower:-distill,ranktower:-fine,ranktower:-coarse")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="for MODEL:pointwise, evaluate this `prerank train` checkpoint instead of training (repeatable)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--list-batch-size", type=int, default=32, help="requests per listwise batch")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--two-tower-k", type=int, default=50, help="k of the two-tower stage in the two-level view")
    parser.add_argument("--title", default="Cascade requests", help="heading of summary.md")
    parser.add_argument("--lttd-plot", action="store_true", help="plot two-tower-stage recall vs lambda_KD")
    parser.add_argument("--plot-with", action="append", default=[], metavar="RESULTS_JSON",
                        help="results.json of another seed's run to add to the lambda_KD plot (repeatable)")
    parser.add_argument("--latency-rounds", type=int, default=0,
                        help="re-measure per-request latency per architecture in one interleaved pass (UPQE uses it)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.checkpoints = dict(pair.split("=", 1) for pair in args.checkpoint)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, payload = load_checkpoint(Path(args.teacher))
    protocol = ProtocolConfig.from_recorded(payload["extra"]["data_source"]["protocol"])
    data = load_movielens(args.data_dir, protocol, args.ratings_file, args.cache_dir)
    cascade_path = Path(args.cascade)
    if not cascade_path.exists():
        print(f"building the cascade into {cascade_path}", flush=True)
        cascade = build_cascade(data, teacher, CascadeConfig(), progress=print)
        save_cascade(cascade, cascade_path)
    cascade = load_cascade(cascade_path)
    out = Path(args.out)
    results = []
    teacher_cell = out / "runs" / "teacher.json"
    if not teacher_cell.exists():
        test_lists = cascade.lists("test")
        teacher_result = {"variant": f"{teacher.name} (teacher)", "model": teacher.name, "objective": "pointwise",
                          "test_lists": list_report(score_lists(teacher, data, test_lists), test_lists),
                          "test_pointwise": evaluate(teacher, data.test), "epochs_run": payload["extra"].get("epoch", 0),
                          "seconds_per_epoch": 0.0}
        write_json_atomic(teacher_cell, teacher_result)
    results.append(json.loads(teacher_cell.read_text()))

    for variant in args.models.split(","):
        cell = out / "runs" / f"{variant.replace(':', '__')}.json"
        if cell.exists():
            results.append(json.loads(cell.read_text()))
            continue
        print(f"== {variant}", flush=True)
        result = run_variant(variant, data, cascade, args)
        write_json_atomic(cell, result)
        results.append(result)
        print(f"   NDCG@10 {result['test_lists']['ndcg@10']:.4f}  Recall@100 {result['test_lists']['recall@100']:.4f}  "
              f"teacher Recall@10 {result['test_lists']['teacher_recall@10']:.4f}  AUC {result['test_pointwise']['auc']:.4f}", flush=True)
    meta = {"dataset_label": data.meta.get("dataset_label"), "cascade": cascade.meta, "cascade_summary": cascade.summary(),
            "seed": args.seed, "epochs": args.epochs}
    if args.latency_rounds:
        print(f"latency pass ({args.latency_rounds} rounds)", flush=True)
        meta["latency_pass_ms"] = latency_pass(results, data, cascade.lists("test"), args.two_tower_k, args.latency_rounds)
        meta["torch_threads"] = torch.get_num_threads()
    write_json_atomic(out / "results.json", {"meta": meta, "results": results})
    label = data.meta.get("dataset_label")
    text = (f"# {args.title}, {label}\n\nTest requests of the simulated cascade ({cascade.meta['config']}), "
            f"teacher `{cascade.meta['teacher']}`, retriever `{cascade.meta['retriever']}`, seed {args.seed}, "
            f"at most {args.epochs} epochs. Recall/NDCG against the real positive interactions (graded); "
            f"`teacher_*` against the teacher's top-K of the same list. Pointwise AUC/log loss on the test sample table "
            f"(listwise-trained models are not calibrated, so their log loss is not comparable).\n\n"
            f"{summarise(results, meta)}\n")
    if any(r.get("test_two_stage") for r in results):
        text += (f"\n## Two-level view (first stage top-{args.two_tower_k}, final list, latency, UPQE)\n\n"
                 f"{summarise_two_level(results, args.two_tower_k)}\n")
    if args.lttd_plot:
        runs = {f"seed {args.seed}": results}
        for extra in args.plot_with:
            extra_meta = json.loads(Path(extra).read_text())
            runs[f"seed {extra_meta['meta']['seed']}"] = extra_meta["results"]
        plot_kd_sweep(runs, args.two_tower_k, out / "kd_sweep.png", label)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
