#!/usr/bin/env bash
# The toy recipe on one GPU in one call (issue 27), and what a device call brings back.
#
#   OUT=/path/to/results bash benchmarks/toy_recipe_gpu.sh [extra toy.recipe flags]
#
# Trains every stage from scratch (python -m toy.recipe --device cuda --jobs 16 --ship --ship_base: the DiT of
# toy.folders.TOY_DIT, the step counts of configs/toy) within TOY_LIMIT seconds (default 530), draws a frame strip of
# every table row whose model exists (toy.pictures --workdir, sampled on the GPU: there is no ffmpeg there for videos),
# then packs whatever exists into $OUT, also when a stage ran late: recipe.log; results.tgz (the run's toy_results.md,
# per-row scores, frame strips, stage logs and metrics, the DiT config); the files this run shipped (base.safetensors,
# framewise.pt, chunkwise.pt, bf16); the Stage-1 models (ar_framewise.pt, ar_chunkwise.pt, bf16) for toy.diagnose's
# exposure part on a CPU. Each file stays under a device call's 16 MiB. On a device machine (no ffmpeg there; missing
# wheels: ../shared/tools/device-wheels), from a copy of the repository with the wheels in .whl/:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   TOY_LIMIT=530 bash benchmarks/toy_recipe_gpu.sh
# Stages 1-3 from the shipped base, as the real recipe starts from the released Wan2.1, fit one call: 285 and 453 s of
# recipe, 319 and 496 s of call, on two H100s with configs/toy as committed (2026-12-06, docs/toy_results.md):
#   TOY_LIMIT=540 TOY_PICTURES_LIMIT=30 bash benchmarks/toy_recipe_gpu.sh --base_weights \
#       assets/toy/Toy-T2V/diffusion_pytorch_model.safetensors
# Training the base as well (its frame-0 image term included) adds about 420 s (426.5 s on an H100,
# docs/toy_results.md): more than one 10-minute call. The same command again on the same machine while it is warm
# (it keeps the ignored $TOY_WORK folder) continues it, skipping finished stages and resuming a stopped one from
# its last checkpoint.
set -u
: "${OUT:?set OUT to the folder that receives the results}"
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${TOY_WORK:-$repo/output/toy_recipe_gpu}   # ignored by git: a device machine keeps it between calls
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=disabled HF_HUB_OFFLINE=1
cd "$repo"
start=$(date +%s)
timeout "${TOY_LIMIT:-530}" python3 -m toy.recipe --device cuda --workdir "$work" --jobs 16 --ship --ship_base "$@" \
    > "$OUT/recipe.log" 2>&1
echo "toy.recipe exit status $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/recipe.log"
cp "$work/models/init/Toy-T2V/config.json" "$work/dit_config.json" 2>/dev/null   # the DiT this run trained
timeout "${TOY_PICTURES_LIMIT:-40}" python3 -m toy.pictures --workdir "$work" --device cuda --out "$work/strips" \
    >> "$OUT/recipe.log" 2>&1
(cd "$work" && tar czf "$OUT/results.tgz" --ignore-failed-read toy_results.md eval eval_prompts.txt dit_config.json \
    strips logs/*.log logs/*/metrics.jsonl 2>/dev/null)
shipped() {   # a file this run shipped (newer than its DiT folder), not one the repository already held
    [ "$1" -nt "$work/models/init/Toy-T2V/config.json" ] && cp "$1" "$2"
}
shipped assets/toy/Toy-T2V/diffusion_pytorch_model.safetensors "$OUT/base.safetensors"
for v in framewise chunkwise; do
    shipped "assets/toy/checkpoints/$v/causal_forcing.pt" "$OUT/$v.pt"
done
export_bf16='import sys, pathlib, toy.recipe as r; r.export_bf16(*map(pathlib.Path, sys.argv[1:]))'
for stage in ar_framewise ar_chunkwise; do   # Stage-1 models, bf16, for toy.diagnose's exposure part on a CPU
    [ -f "$work/checkpoints/$stage.pt" ] && python3 -c "$export_bf16" "$work/checkpoints/$stage.pt" "$OUT/$stage.pt"
done
ls -la "$OUT"
