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
# Set dmd_framewise_seeds: how much of one frame-wise DMD stage's spread over training seeds (0.65-0.79) does an EMA
# of the generator remove? From the causal ODE model of the run in $TOY_INIT (a recipe workdir, or a folder with its
# checkpoints/ode_framewise.pt and dataset/train_prompts.txt; e.g. the shipped generator's run), the stage as
# configs/toy has it with training seed 0-3 ($TOY_SEEDS) and the generator's EMA kept from critic step
# $TOY_EMA_START (default 100, generator step 20 of 60) with decay 0.9 or 0.95 ($TOY_EMA_DECAYS), for the config's
# critic steps or $TOY_DMD_STEPS; each line scores the
# raw generator (dmd_framewise_4) and its EMA (dmd_framewise_4_ema) on the evaluation prompts and, with the same
# protocol, on prompts/toy_val.txt (<workdir>/eval_val.json); the best line on the validation prompts brings its
# bf16 weights back ($OUT/framewise_best_ema.pt, $OUT/framewise_best_raw.pt).
# Same seed everywhere, so the variants differ from ref by their change alone; rows are scored on the 48 evaluation
# prompts x 2 seeds (toy.diagnose; compare two of them by prompt with python -m toy.diagnose --compare A.json B.json,
# the files under <workdir>/eval/). Packs every row's scores, frame strips (toy.pictures, TOY_PICTURES_LIMIT s after
# the deadline) and the stages' logs into $OUT/toy_ab.tgz and prints a table. Checkpoints stay in $TOY_AB_WORK.
# A smoke run on a CPU: TOY_DEVICE=cpu TOY_FLAGS=--quick (2 steps per stage).
set -u
: "${OUT:?set OUT to the folder that receives the results}"
repo=$(cd "$(dirname "$0")/.." && pwd)
set_name=${1:-dmd}
case $set_name in dmd|stage1_framewise|dmd_framewise_seeds) ;;
    *) echo "unknown set $set_name: dmd, stage1_framewise or dmd_framewise_seeds" >&2; exit 2;; esac
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
elif [ "$set_name" = dmd_framewise_seeds ]; then
    : "${TOY_INIT:?set TOY_INIT to a run with checkpoints/ode_framewise.pt and dataset/train_prompts.txt}"
    seed_line() {   # SEED DECAY: one DMD stage, then its rows on the validation prompts
        local work=$root/s$1_e$2${TOY_DMD_STEPS:+_n$TOY_DMD_STEPS} t
        mkdir -p "$work/checkpoints" "$work/dataset"
        cp "$TOY_INIT/checkpoints/ode_framewise.pt" "$work/checkpoints/"
        cp "$TOY_INIT/dataset/train_prompts.txt" "$work/dataset/"
        recipe "$work" "${base[@]}" --only dmd_framewise --rows dmd_framewise_4 dmd_framewise_4_ema \
            ${TOY_DMD_STEPS:+--steps dmd_framewise=$TOY_DMD_STEPS} \
            --stage_override dmd_framewise:seed="$1" dmd_framewise:ema_weight="$2" \
            dmd_framewise:ema_start_step="${TOY_EMA_START:-100}"
        t=$(left); [ "$t" -gt 0 ] && [ -f "$work/checkpoints/dmd_framewise.pt" ] || return
        timeout "$t" python3 -m toy.diagnose --workdir "$work" --parts models --rows dmd_framewise_4 \
            dmd_framewise_4_ema --prompts prompts/toy_val.txt --num_samples "${TOY_VAL_SAMPLES:-2}" \
            --num_real "${TOY_VAL_REAL:-64}" --seed 0 --per_video --device "${TOY_DEVICE:-cuda}" \
            --out "$work/eval_val.json" > "$work/val.log" 2>&1
        echo "$(basename "$work"): validation exit $?" | tee -a "$OUT/ab.log"
    }
    for seed in ${TOY_SEEDS:-0 1 2 3}; do
        for decay in ${TOY_EMA_DECAYS:-0.9 0.95}; do seed_line "$seed" "$decay" & done
    done
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
if [ "$set_name" = dmd_framewise_seeds ]; then   # the best line on the validation prompts, raw and EMA, in bf16
    python3 - "$root" "$OUT" <<'EOF' | tee -a "$OUT/ab.log"
import json, pathlib, sys
from toy.recipe import export_bf16
root, out = map(pathlib.Path, sys.argv[1:])
for row, use_ema in (("dmd_framewise_4", False), ("dmd_framewise_4_ema", True)):
    scored = [(json.loads(p.read_text())[f"model:{row}"]["aggregate"]["faithfulness"], p.parent.name)
              for p in root.glob("*/eval_val.json") if f"model:{row}" in json.loads(p.read_text())]
    if scored:
        score, name = max(scored)
        target = out / f"framewise_best_{'ema' if use_ema else 'raw'}.pt"
        export_bf16(root / name / "checkpoints" / "dmd_framewise.pt", target, use_ema=use_ema)
        print(f"best {row} on the validation prompts: {name} ({score:.3f}) -> {target.name}")
EOF
fi
cd "$root" && tar czf "$OUT/toy_ab.tgz" --ignore-failed-read */eval */eval_val.json */strips */recipe.log */val.log \
    */logs/*.log */logs/*/metrics.jsonl 2>/dev/null
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
