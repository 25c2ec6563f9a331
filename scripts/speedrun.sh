#!/usr/bin/env bash
# nanoseek speedrun: a DeepSeek-V3.2-style model from nothing on a laptop CPU, in one command. Stages:
#   1. byte-level BPE tokenizer (8192 tokens) on the default corpus (this Python's standard library source)
#   2. pre-training of the `small` preset (MoE 40 experts top-6 + shared, MTP depth 1, ~96M total / 26M active)
#      with aux-loss-free balancing, the token embedding and output head at 6x the body's learning rate, in the
#      dtype the CPU runs fast (bf16 or float32), held-out bits per byte every EVAL_EVERY steps
#   3. DSA dense warm-up: only the lightning indexers train, on rows of 512 tokens (index_topk 256)
#   4. DSA sparse stage: everything trains with top-256 attention; held-out bits per byte; sampled completions
#   5. report: RUN/report.md (+ each stage's own report.md, metrics.jsonl and plots)
#
# Cost (2 cores, 2 threads, cold torch.compile cache; README "Train"): AMD EPYC Zen 4 with AVX-512 BF16 (bfloat16,
# picked by --dtype auto) 8 min 21 s wall, held-out 1.643 bits/byte after pre-training and 1.638 after the DSA
# stages (2026-12-05). With the recipe before (320 pre-training steps, one learning rate): AMD EPYC Zen 3 with AVX2
# (float32) 26 min 13 s, 1.640 and 1.648 (2026-12-03); AMD EPYC Zen 5 with AVX-512 BF16 9 min 09 s, 1.64 and 1.665.
#
# Usage: bash scripts/speedrun.sh            (everything below can be overridden from the environment)
#        DATA=~/my_texts bash scripts/speedrun.sh     to train on your own text instead (files or folders)
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/speedrun}
DATA=${DATA:-}                      # empty = the Python standard library source
PRE_STEPS=${PRE_STEPS:-256}         # pre-training steps of BATCH x SEQ_LEN tokens
BATCH=${BATCH:-8}
SEQ_LEN=${SEQ_LEN:-256}
LR=${LR:-2e-3}
EMBED_LR_SCALE=${EMBED_LR_SCALE:-6} # the embedding's and head's lr as a multiple of LR (README "Train")
EVAL_EVERY=${EVAL_EVERY:-128}       # held-out bits per byte every EVAL_EVERY steps (each costs ~3 training steps)
WARM_STEPS=${WARM_STEPS:-10}        # DSA warm-up steps (rows of DSA_SEQ_LEN)
WARM_LR=${WARM_LR:-3e-3}            # the indexers' lr in the warm-up
SPARSE_STEPS=${SPARSE_STEPS:-20}    # DSA sparse-stage steps
DSA_SEQ_LEN=${DSA_SEQ_LEN:-512}
DSA_BATCH=${DSA_BATCH:-4}
DTYPE=${DTYPE:-auto}               # auto: bfloat16 where the CPU computes it natively and fast, else float32

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv (one-time; not counted in the timings below)"
  python3 -m venv .venv
  .venv/bin/pip install --upgrade pip
  .venv/bin/pip install torch==2.13.0 ${TORCH_PIP_ARGS:-}
  .venv/bin/pip install -e .
fi
PY=.venv/bin/python
DATA_ARGS=()
if [ -n "$DATA" ]; then DATA_ARGS=(--data "$DATA"); fi
mkdir -p "$RUN"
t0=$(date +%s)
stamp() { echo "$(( $(date +%s) - t0 ))"; }

echo "== 1/4 tokenizer"
$PY -m nanoseek tokenizer train "${DATA_ARGS[@]}" --vocab-size 8192 --out "$RUN/tokenizer" | tee "$RUN/tokenizer.log"
t_tok=$(stamp)

echo "== 2/4 pre-training (small preset, MoE + MTP)"
$PY -m nanoseek train "${DATA_ARGS[@]}" --tokenizer "$RUN/tokenizer" --preset small --out "$RUN/pretrain" \
  --max-steps "$PRE_STEPS" --seq-len "$SEQ_LEN" --batch-size "$BATCH" --lr "$LR" --min-lr 2e-4 --warmup 30 \
  --dtype "$DTYPE" --eval-every "$EVAL_EVERY" --eval-tokens 16384 --save-every 100 --mtp-weight 0.3 \
  --embed-lr-scale "$EMBED_LR_SCALE" --bias-update-speed 1e-3 --seq-aux-alpha 1e-4 --samples 2
t_pre=$(stamp)

# The two short DSA stages run eagerly: compiled, their steps are no faster (explicit attention and the indexer's
# scoring, with their KL, dominate) and the cold compile costs about 45 s; the pre-training steps are compiled.
# The warm-up's 10 steps at 3e-3 end at the indexer KL and top-k recall of 20 at 1e-3 (4.0 / 0.971 against 4.8 /
# 0.970), and the sparse stage after them at the same held-out bits per byte (1.6332 against 1.6330; README "Train").
echo "== 3/4 DSA warm-up (indexers only, dense attention, rows of $DSA_SEQ_LEN)"
$PY -m nanoseek train "${DATA_ARGS[@]}" --init "$RUN/pretrain/final" --dsa-stage warmup --out "$RUN/dsa_warmup" \
  --max-steps "$WARM_STEPS" --seq-len "$DSA_SEQ_LEN" --batch-size "$DSA_BATCH" --lr "$WARM_LR" --warmup 2 \
  --dtype "$DTYPE" --eval-tokens 0 --no-compile
t_warm=$(stamp)

echo "== 4/4 DSA sparse training (top-k attention, everything trains)"
$PY -m nanoseek train "${DATA_ARGS[@]}" --init "$RUN/dsa_warmup/final" --dsa-stage sparse --out "$RUN/dsa_sparse" \
  --max-steps "$SPARSE_STEPS" --seq-len "$DSA_SEQ_LEN" --batch-size "$DSA_BATCH" --lr 2e-4 --min-lr 1e-4 \
  --warmup 2 --dtype "$DTYPE" --eval-tokens 16384 --samples 4 --sample-tokens 64 --no-compile
t_end=$(stamp)

# -- the run's report: timings, held-out bits per byte, DSA indexer, samples (from the stages' summaries) ------
$PY - "$RUN" "$t_tok" "$t_pre" "$t_warm" "$t_end" <<'EOF'
import json, sys
from pathlib import Path
run, t_tok, t_pre, t_warm, t_end = Path(sys.argv[1]), *map(int, sys.argv[2:])
S = {s: json.loads((run / s / "summary.json").read_text()) for s in ("pretrain", "dsa_warmup", "dsa_sparse")}
M = {s: [json.loads(l) for l in (run / s / "metrics.jsonl").read_text().splitlines()] for s in S}
kl = [r["indexer_kl"] for r in M["dsa_warmup"]]
pre = S["pretrain"]
lines = ["# nanoseek speedrun", "",
         f"Total {t_end / 60:.1f} min: tokenizer {t_tok}s, pre-training {t_pre - t_tok}s, "
         f"DSA warm-up {t_warm - t_pre}s, DSA sparse {t_end - t_warm}s.", "",
         "| stage | steps | tokens | tokens/s | final train LM loss | held-out bits/byte |", "|---|---|---|---|---|---|"]
for s, v in S.items():
    bpb, lm = v.get("heldout_bits_per_byte"), v.get("final_lm_loss")  # (the DSA warm-up has no LM loss)
    lines.append(f"| {s} | {v['steps']} | {v['tokens']:,} | {v['tokens_per_s'] or 0:,.0f} | "
                 f"{'' if lm is None else f'{lm:.4f}'} | {'' if bpb is None else f'{bpb:.4f}'} |")
lines += ["", f"Model: small preset, {pre['params_total'] / 1e6:.1f}M parameters, "
              f"{pre['params_active'] / 1e6:.1f}M activated per token; {pre['dtype']} on {pre['device']}.",
          f"DSA warm-up: indexer KL {kl[0]:.4f} -> {kl[-1]:.4f}, top-k recall "
          f"{M['dsa_warmup'][0]['indexer_recall']:.3f} -> {M['dsa_warmup'][-1]['indexer_recall']:.3f}.", "",
          "Stage reports: [pre-training](pretrain/report.md), [DSA warm-up](dsa_warmup/report.md), "
          "[DSA sparse](dsa_sparse/report.md).", ""]
rep = (run / "dsa_sparse" / "report.md").read_text()
if "## Samples" in rep:
    lines.append(rep[rep.index("## Samples"):])
(run / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:12]))
EOF
echo "== done in $(( t_end / 60 ))m$(( t_end % 60 ))s; report: $RUN/report.md; model: $RUN/dsa_sparse/final"
