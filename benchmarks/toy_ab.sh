#!/usr/bin/env bash
# Side-by-side variants of toy-recipe stages on one GPU in one call (issue 27): what limits the toy generators?
#
#   OUT=/path/to/results TOY_LIMIT=540 bash benchmarks/toy_ab.sh [dmd|stage1_framewise]
#
# Every line starts from the shipped base (--base_weights assets/toy/Toy-T2V/...: no base training) and runs
# python -m toy.recipe --only, each in its own workdir under $TOY_AB_WORK (default output/toy_ab_<set>).
# Set dmd (the default): why does DMD lower its initialisation?
#   ref  Stage 1 -> causal ODE -> DMD, frame-wise and chunk-wise, with the configs/toy settings of the day (chunk-wise
#        DMD pinned to guidance 3.0 and 5 critic steps per generator step, 240 steps: what it studied);
#   big  the same with 4x the batch in every stage (Stage 1 and ODE 64, DMD 16): gradient noise, one lever for all;
#   and, from ref's ODE inits as soon as they exist, one DMD stage with one change each:
#   cw_g1 / fw_g1   real-score guidance 1.0 instead of 3.0 (does the guided score bleach colours?)
#   cw_r10          10 critic steps per generator step (480 critic, the same 48 generator steps): does the critic lag?
#   cw_b16 / fw_b16 DMD batch 16 instead of 4 (a noisy DMD gradient?)
# Set stage1_framewise: is the frame-wise line's limit its Stage 1 (0.64 at 50 steps against chunk-wise 0.88)?
# Frame-wise Stage 1 -> causal ODE -> DMD, each line with one change to Stage 1 alone:
#   ref       400 steps at lr 1e-4, equal frame weights (configs/toy before this set);
#   s800      800 steps;   lr3  lr 3e-4;
#   lr3_s800 both;   f0w3  latent frame 0 weighted 3x in the Stage-1 loss (first_frame_loss_weight: frame 0);
#   s800_f0w3 800 steps with frame 0 weighted 3x.
# Same seed everywhere, so the variants differ from ref by their change alone; rows are scored on the 48 evaluation
# prompts x 2 seeds (toy.diagnose; compare two of them by prompt with python -m toy.diagnose --compare A.json B.json,
# the files under <workdir>/eval/). Packs every row's scores, frame strips (toy.pictures, TOY_PICTURES_LIMIT s after
# the deadline) and the stages' logs into $OUT/toy_ab.tgz and prints a table. Checkpoints stay in $TOY_AB_WORK.
# A smoke run on a CPU: TOY_DEVICE=cpu TOY_FLAGS=--quick (2 steps per stage).
set -u
: "${OUT:?set OUT to the folder that receives the results}"
repo=$(cd "$(dirname "$0")/.." && pwd)
set_name=${1:-dmd}
case $set_name in dmd|stage1_framewise) ;; *) echo "unknown set $set_name: dmd or stage1_framewise" >&2; exit 2;; esac
root=${TOY_AB_WORK:-$repo/output/toy_ab_$set_name}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=disabled HF_HUB_OFFLINE=1
cd "$repo"
deadline=$(( $(date +%s) + ${TOY_LIMIT:-540} ))
left() { echo $(( deadline - $(date +%s) )); }
recipe() {   # WORKDIR, then toy.recipe flags; stopped at the deadline
    local work=$1 t; shift
    mkdir -p "$work"
    t=$(left); [ "$t" -gt 0 ] || { echo "$(basename "$work"): no time left" | tee -a "$OUT/ab.log"; return; }
    timeout "$t" python3 -m toy.recipe --device "${TOY_DEVICE:-cuda}" --workdir "$work" --jobs 8 ${TOY_FLAGS:-} "$@" \
        > "$work/recipe.log" 2>&1
    echo "$(basename "$work"): exit $? at $(( ${TOY_LIMIT:-540} - $(left) )) s" | tee -a "$OUT/ab.log"
}
variant() {   # NAME INIT_STAGE DMD_STAGE OVERRIDES...: one DMD stage from ref's init, in its own workdir
    local name=$1 init=$2 stage=$3; shift 3
    local work=$root/$name
    until [ -f "$root/ref/checkpoints/$init.pt" ] || [ "$(left)" -le 0 ]; do sleep 2; done
    mkdir -p "$work/checkpoints"
    ln -sfn "$root/ref/models" "$work/models"; ln -sfn "$root/ref/dataset" "$work/dataset"
    ln -sf "$root/ref/checkpoints/base.pt" "$root/ref/checkpoints/$init.pt" "$work/checkpoints/"
    recipe "$work" --only "$stage" "$@"
}
base=(--base_weights assets/toy/Toy-T2V/diffusion_pytorch_model.safetensors)
: > "$OUT/ab.log"
if [ "$set_name" = dmd ]; then
    # chunk-wise DMD as it was configured when this set was made (configs/toy now sets guidance 1.0, ratio 10, 480)
    cw=(dmd_chunkwise:guidance_scale=3.0 dmd_chunkwise:dfake_gen_update_ratio=5)
    stages="ar_framewise ar_chunkwise ode_framewise ode_chunkwise dmd_framewise dmd_chunkwise"
    rows="ar_framewise_50 ode_framewise_4 ode_chunkwise_4 dmd_framewise_4 dmd_chunkwise_4"
    recipe "$root/ref" "${base[@]}" --only $stages --rows $rows --steps dmd_chunkwise=240 --stage_override "${cw[@]}" &
    big=(); for s in ar_framewise ar_chunkwise ode_framewise ode_chunkwise; do big+=("$s:batch_size=64"); done
    recipe "$root/big" "${base[@]}" --only $stages --rows $rows --steps dmd_chunkwise=240 \
        --stage_override "${big[@]}" "${cw[@]}" dmd_framewise:batch_size=16 dmd_chunkwise:batch_size=16 &
    variant cw_g1 ode_chunkwise dmd_chunkwise --steps dmd_chunkwise=240 \
        --stage_override "${cw[@]}" dmd_chunkwise:guidance_scale=1.0 &
    variant cw_r10 ode_chunkwise dmd_chunkwise --steps dmd_chunkwise=480 \
        --stage_override "${cw[@]}" dmd_chunkwise:dfake_gen_update_ratio=10 &
    variant cw_b16 ode_chunkwise dmd_chunkwise --steps dmd_chunkwise=240 \
        --stage_override "${cw[@]}" dmd_chunkwise:batch_size=16 &
    variant fw_g1 ode_framewise dmd_framewise --stage_override dmd_framewise:guidance_scale=1.0 &
    variant fw_b16 ode_framewise dmd_framewise --stage_override dmd_framewise:batch_size=16 &
else
    stages="ar_framewise ode_framewise dmd_framewise"
    rows="ar_framewise_50 ode_framewise_4 dmd_framewise_4"
    # every line pins the Stage 1 this set studied (400 steps, equal frame weights), then changes it; configs/toy now
    # trains the frame-wise Stage 1 as s800_f0w3 does
    line() {   # NAME STEPS FRAME0_WEIGHT [more ar_framewise:KEY=VALUE overrides]
        local name=$1 steps=$2 weight=$3; shift 3
        recipe "$root/$name" "${base[@]}" --only $stages --rows $rows --steps ar_framewise="$steps" \
            --stage_override ar_framewise:first_frame_loss_weight="$weight" "$@" &
    }
    line ref 400 1
    line s800 800 1
    line lr3 400 1 ar_framewise:lr=3e-4
    line lr3_s800 800 1 ar_framewise:lr=3e-4
    line f0w3 400 3
    line s800_f0w3 800 3
fi
wait
for work in "$root"/*/; do   # a frame strip of every row each workdir has a model of (8 prompts, seed 0)
    timeout "${TOY_PICTURES_LIMIT:-60}" python3 -m toy.pictures --workdir "$work" --device "${TOY_DEVICE:-cuda}" \
        --out "$work/strips" > "$work/pictures.log" 2>&1 &
done
wait
cd "$root" && tar czf "$OUT/toy_ab.tgz" --ignore-failed-read */eval */strips */recipe.log */logs/*.log \
    */logs/*/metrics.jsonl 2>/dev/null
python3 - "$root" <<'EOF' | tee -a "$OUT/ab.log"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/eval/*.json")):
    for key, row in json.loads(path.read_text()).items():
        if key.startswith("model:"):
            a = {k: ("-" if v is None else f"{v:.2f}" if isinstance(v, float) else v) for k, v in row["aggregate"].items()}
            print(f"{path.parent.parent.name:9s} {key[6:]:18s} F {a['faithfulness']} colour {a['color']} "
                  f"shape {a['shape']} dir {a['direction']} speed {a['speed']} "
                  f"frame0 missing {a['frame0_missing']}/{a['count']} jitter {a['jitter_px']}")
EOF
