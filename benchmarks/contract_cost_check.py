"""One source tree's costs on ML-1M (users 1–2999) shapes, for before/after comparisons of a refactor.

TARQ: median wall and CPU time of a training step (batch 2048, forward + backward + Adam; 20 timed
after 3). FIT: one request of 1,000 candidates (encode_user + gather + score; p50/p99 of 300 after
30). Prints one JSON line. Run it from each tree, alternating, on one core:

    cd TREE && PYTHONPATH=src OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/contract_cost_check.py DATA_DIR CACHE_DIR
"""
import json, os, sys, time
import numpy as np
import torch
from prerank.data.movielens import load_movielens
from prerank.data.pipeline import ProtocolConfig
from prerank.models import create_model
torch.set_num_threads(1)
data_dir, cache = sys.argv[1], sys.argv[2]
data = load_movielens(data_dir, ProtocolConfig(name="temporal"), "ratings-partial-users0001-2999/ratings.dat.gz", cache)
out = {}
# TARQ: 20 timed training steps (after 3 warm-up) of batch 2048, forward + backward + Adam.
torch.manual_seed(0)
model = create_model("tarq", data.schema).train()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
tensors = data.train.subset(np.arange(2048 * 23)).to_tensors()
cols = [f.name for f in model.schema.features] + ["label"]
wall, cpu = [], []
for step in range(23):
    batch = {k: tensors[k][step * 2048:(step + 1) * 2048] for k in cols}
    t0, c0 = time.perf_counter(), time.process_time()
    out_ = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out_.logits.reshape(-1), batch["label"]) + sum(out_.aux_losses.values())
    opt.zero_grad(); loss.backward(); opt.step()
    if step >= 3:
        wall.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
out["tarq_train_step_ms"] = {"wall_median": 1e3 * float(np.median(wall)), "cpu_median": 1e3 * float(np.median(cpu))}
# FIT: one request of 1,000 candidates, encode_user + gather + score, 300 timed after 30.
torch.manual_seed(0)
fit = create_model("fit", data.schema).eval()
with torch.inference_mode():
    table = fit.encode_catalogue(data.items.to_tensors())
    user = fit.user_inputs(data.test.subset(np.arange(1)).to_tensors())
    rows = torch.randint(0, len(data.item_raw_ids), (1, 1000), generator=torch.Generator().manual_seed(0))
    def gather(t, r): return {k: v.index_select(0, r.reshape(-1)).reshape(*r.shape, *v.shape[1:]) for k, v in t.items()}
    w, c = [], []
    for i in range(330):
        t0, c0 = time.perf_counter(), time.process_time()
        fit.score(fit.encode_user(user), gather(table, rows))
        if i >= 30:
            w.append(time.perf_counter() - t0); c.append(time.process_time() - c0)
out["fit_request_1000_ms"] = {"wall_p50": 1e3 * float(np.percentile(w, 50)), "wall_p99": 1e3 * float(np.percentile(w, 99)),
                              "cpu_p50": 1e3 * float(np.percentile(c, 50)), "cpu_p99": 1e3 * float(np.percentile(c, 99))}
out["fit_item_state_bytes"] = sum(v.element_size() * v[0].numel() for v in table.values())
out["load_average_1min"] = os.getloadavg()[0]
print(json.dumps(out))
