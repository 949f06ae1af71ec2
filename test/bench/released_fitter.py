#!/usr/bin/python3
# Benchmark driver: time the paper's released weight fitter (rbr_weight_fitter.py
# of github.com/openai/safety-rbr-code-and-data, PyTorch, full-batch AdamW) on
# the rows test/bench/fit_bench.sh exports, so that its figures stand beside
# rbr_fit's. This file holds none of the released code: it imports it from the
# checkout given as the second argument.
#
# Usage: released_fitter.py ROWS.csv RELEASED_DIR MODE [THREADS]
#   ROWS.csv      prompt,rt,tier,rm,f1..fd (header line; tier 0 is best)
#   RELEASED_DIR  a checkout holding rbr_weight_fitter.py
#   MODE          "as-released": the fitter as published, which forms its pairs
#                 by testing every pair of rows of a response type (n(n-1)/2);
#                 "pairs-per-prompt": the same fitter with the same pairs formed
#                 within each prompt only (the quadratic pair search replaced)
#   THREADS       PyTorch's threads (default: every core)
# Prints one JSON object per response type: seconds per phase and the weights.
# Settings as the paper's example: lr 0.01, 1000 steps, weight decay 0.05,
# margin 1; train_data_frac 1.0, so that it fits the pairs rbr_fit fits.
import csv
import json
import os
import sys
import time

released_dir, mode = sys.argv[2], sys.argv[3]
sys.path.insert(0, released_dir)
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import rbr_weight_fitter as rw  # noqa: E402

torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else (os.cpu_count() or 1))
if mode not in ("as-released", "pairs-per-prompt"):
    sys.exit("mode must be as-released or pairs-per-prompt")

t_read = time.perf_counter()
by_rt = {}
names = None
with open(sys.argv[1], newline="") as f:
    r = csv.reader(f)
    header = next(r)
    names = header[4:]
    for row in r:
        prompt, rt, tier, rm = row[0], row[1], int(row[2]), float(row[3])
        feats = dict(zip(names, map(float, row[4:])))
        by_rt.setdefault(rt, []).append(
            rw.RBR_ExampleWithMetadata(convo_prompt=prompt, convo_completion="",
                                       response_type=rt, completion_label="t%d" % tier,
                                       base_reward=rm, features=feats))
t_read = time.perf_counter() - t_read


class PerPromptFitter(rw.RBRWeightFitter):
    """The released fitter with its pairs formed within each prompt."""

    def get_orderings(self):
        groups = {}
        for i, ex in enumerate(self.examples):
            groups.setdefault(ex.convo_prompt, []).append(i)
        pairs = []
        for idx in groups.values():
            for a in range(len(idx)):
                for b in range(a + 1, len(idx)):
                    e1, e2 = self.examples[idx[a]], self.examples[idx[b]]
                    if e2.completion_label in self.orderings[e1.completion_label]:
                        pairs.append([idx[a], idx[b], self.completion_label_margin.get(e1.completion_label, 1)])
                    elif e1.completion_label in self.orderings[e2.completion_label]:
                        pairs.append([idx[b], idx[a], self.completion_label_margin.get(e2.completion_label, 1)])
        np.random.default_rng().shuffle(pairs)
        return torch.tensor(pairs, dtype=torch.int64)


cls = rw.RBRWeightFitter if mode == "as-released" else PerPromptFitter
print(json.dumps({"read_s": t_read, "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
for rt in sorted(by_rt):
    examples = by_rt[rt]
    tiers = sorted({int(e.completion_label[1:]) for e in examples})
    orderings = {"t%d" % t: ["t%d" % u for u in tiers if u > t] for t in tiers}
    fitter = cls(feature_names=names, examples=examples, orderings=orderings,
                 train_data_frac=1.0, margin=1, lr=1e-2, wd=0.05, n_iters=1000)
    # fit_weights() = validate_examples, get_orderings, prepare_optimization, 1000 steps;
    # the pair search is timed on its own by calling it first, as fit_weights does.
    t0 = time.perf_counter()
    pairs = fitter.get_orderings()
    t1 = time.perf_counter()
    fitter.get_orderings = lambda p=pairs: p
    weights, metrics = fitter.fit_weights()
    t2 = time.perf_counter()
    print(json.dumps({"rt": rt, "rows": len(examples), "pairs": int(pairs.shape[0]),
                      "pairs_s": t1 - t0, "fit_s": t2 - t1, "total_s": t2 - t0,
                      "loss": metrics["loss"][-1],
                      "weights": [float(weights[n]) for n in names]}), flush=True)
