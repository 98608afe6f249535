"""python -m toy.diagnose (issue 27): the data-side parts on ground-truth clips, and the teacher-forcing plumbing of
its exposure part (a rollout forced on its own latents must reproduce itself)."""

import json

import numpy as np
import pytest
import torch

from toy import diagnose


def test_ceiling_and_vae_parts(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    out = tmp_path / "diag.json"
    assert diagnose.main(["--parts", "ceiling", "vae", "--num_clips", "4", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ceiling, vae = result["ceiling"]["aggregate"], result["vae"]["aggregate"]
    assert ceiling["faithfulness"] == 1.0 and ceiling["frame0_missing"] == 0 and ceiling["count"] == 4
    assert sum(ceiling["shape_confusion"].values()) == 4
    assert all(k.split("->")[0] == k.split("->")[1] for k in ceiling["shape_confusion"])
    # Measured: 1.0 on these 4 clips (0.99 on 24, docs/toy_results.md); one wrong attribute would give 0.94.
    assert vae["faithfulness"] >= 0.85 and vae["jitter_px"] < 1.0, vae
    # Latent frame 0 encodes one pixel frame, the others four: the least spread (measured 0.62 vs 0.78-0.95 on 24).
    spread = result["vae"]["latent_std_per_frame"]
    assert len(spread) == 9 and spread[0] < min(spread[1:]), spread
    # ... and is coded apart: per channel its mean sits off the later frames' (measured up to 1.3 of their std on 24).
    assert len(result["vae"]["frame0_channel_offset"]) == 16 and max(result["vae"]["frame0_channel_offset"]) > 0.5
    # Decodes of noised latents: a quarter of the later frames' std leaves the object in place (measured on 24 clips:
    # 0.96-1.00 per latent frame; at 1.0 x std frame 0 keeps it least, 0.83 against 0.89-1.00).
    presence = result["vae"]["latent_noise_presence"]
    assert set(presence) == {str(s) for s in diagnose.LATENT_NOISE} and all(len(p) == 9 for p in presence.values())
    assert min(presence["0.25"]) >= 0.75, presence
    # Frame 0 decoded from its own code keeps the object (as the round trip's scores say) ...
    assert result["vae"]["frame0_code_swap"]["frame0_present"]["as_coded"] == 1.0
    # The shipped VAE codes green and orange far closer in frame 0 than later (measured: 3.6 against 23.3, 0.15)
    assert result["vae"]["color_separation"]["pairs"]["green-orange"]["ratio"] < 0.5


def test_frame0_channel_offset_is_frame_0s_mean_in_units_of_the_later_frames_std():
    """A VAE whose latent frame 0 sits 2 later-frame standard deviations off in channel 0 and nowhere else."""
    z = torch.randn(4, 9, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    z[:, 0] = 0.0
    z[:, 0, 0] = 1.0                                                  # later frames: mean 0, std 0.5 -> offset 2

    class FakeVAE:
        device = torch.device("cpu")

        def encode(self, videos):
            return z[:len(videos)]

        def decode(self, latents):
            return torch.zeros(len(latents), 33, 3, 8, 8)

    clips = [np.zeros((33, 8, 8, 3), np.uint8)] * 4
    _, stats, _ = diagnose.vae_roundtrip(FakeVAE(), clips, batch=4)
    offset = stats["frame0_channel_offset"]
    assert offset[0] == pytest.approx(2.0, abs=0.05) and max(offset[1:]) < 0.05, offset


def test_frame0_code_swap_decodes_latent_frame_1_in_the_first_slot():
    """A decoder that draws frame 0's red square only from a first latent frame holding frame 0's code (1.0): as coded
    every clip shows it, with latent frame 1's code (0.0) in that slot none does."""
    from toy.world import COLORS
    from utils.video import pixels_to_uint8

    z = torch.zeros(3, 9, 2, 4, 4)
    z[:, 0] = 1.0

    class FakeVAE:
        def decode(self, latents):
            video = -torch.ones(len(latents), 33, 3, 32, 32)                      # black, pixels in [-1, 1]
            red = torch.tensor(COLORS["red"], dtype=torch.float32) / 127.5 - 1
            for b, first in enumerate(latents[:, 0].mean((1, 2, 3))):
                if first > 0.5:
                    video[b, :, :, 8:24, 8:24] = red[:, None, None]
            return video

    clips = [("a red square moving left slowly", None)] * 3
    decoded = list(pixels_to_uint8(FakeVAE().decode(z)).numpy())                # the round trip's decodes
    swap = diagnose.frame0_code_swap(FakeVAE(), clips, z, decoded, batch=2)
    assert swap["frame0_present"] == {"as_coded": 1.0, "frame1_code": 0.0}
    assert swap["frame0_rgb_shift_median"] is None                              # nothing found to compare with
    assert torch.equal(z[:, 0], torch.ones(3, 2, 4, 4))                         # the caller's latents are left alone


class _ColourVAE:
    """A stand-in encoder: latent frame f is the mean RGB of each 8x8 tile over the pixel frames it codes (frame 0:
    pixel frame 0 alone, then four each), and latent frame 0 codes no red: its red channel holds the background's."""

    device = torch.device("cpu")

    def encode(self, x: torch.Tensor) -> torch.Tensor:            # [B, 3, T, H, W] -> [B, F, 3, H/8, W/8]
        first = x[:, :, :1].clone()
        first[:, 0] = 24 / 127.5 - 1                               # toy.world.BACKGROUND (24, 24, 24)
        rest = x[:, :, 1:].unflatten(2, (-1, 4)).mean(3)
        z = torch.cat([first, rest], dim=2)
        return torch.nn.functional.avg_pool3d(z, (1, 8, 8)).transpose(1, 2)


def test_color_separation_finds_the_pairs_frame_0_codes_closer():
    """With red dropped from frame 0's code, a pair that differs mostly in red (green 40,180,60 / yellow
    235,215,40) comes out far closer in frame 0 than later, one that does not differ in red at all (blue 40,80,230 /
    cyan 40,210,220) about as close (cyan / white: red is their difference); red against an empty clip (220,40,40
    on 24,24,24) nearly vanishes in frame 0."""
    result = diagnose.color_separation(_ColourVAE(), (33, 64, 64), num_settings=3)
    pairs = result["pairs"]
    assert len(pairs) == 28 and list(pairs.values())[0]["frame0"] == min(p["frame0"] for p in pairs.values())
    assert pairs["green-yellow"]["ratio"] < 0.5 < pairs["blue-cyan"]["ratio"], pairs
    assert pairs["cyan-white"]["ratio"] < 0.5 and pairs["green-yellow"]["later"] > pairs["blue-cyan"]["later"]
    # no red difference: as far apart as later, up to frame 0's smaller spread (no red) that the units divide out
    assert 0.8 < pairs["blue-cyan"]["ratio"] < 1.5, pairs["blue-cyan"]
    assert result["empty"]["red"]["ratio"] < 0.3 < result["empty"]["blue"]["ratio"], result["empty"]


def test_frame0_confusions_counts_what_a_missed_frame_0_shows(tmp_path):
    def video(color, present, shown):
        return {"prompt": f"a {color} circle moving left quickly", "target": {"color": color},
                "frame0_present": present, "frame0_color": shown}

    nested = {"group": {"model:a": {"videos": [video("cyan", False, "white"), video("cyan", True, "cyan"),
                                               video("orange", False, None)]}},
              "other": {"model:b": {"videos": [video("white", False, "cyan"), video("green", False, "orange")]}}}
    (tmp_path / "r.json").write_text(json.dumps(nested))
    out = tmp_path / "c.json"
    assert diagnose.main(["--frame0_confusions", str(tmp_path / "r.json"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["confusions"] == {"cyan>white": 1, "orange>none": 1, "white>cyan": 1, "green>orange": 1}
    assert result["unordered"] == {"cyan-white": 2, "orange>none": 1, "green-orange": 1}
    assert {name: s["missed"] for name, s in result["sets"].items()} == {
        f"{tmp_path / 'r.json'}:group/model:a": 2, f"{tmp_path / 'r.json'}:other/model:b": 2}
    # one named entry only
    assert diagnose.main(["--frame0_confusions", f"{tmp_path / 'r.json'}:other/model:b", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["confusions"] == {"white>cyan": 1, "green>orange": 1}


@pytest.mark.parametrize("config", ["causal_forcing_dmd_chunkwise", "causal_forcing_dmd_framewise"])
def test_teacher_forcing_on_its_own_rollout_reproduces_it(config, repo_root, monkeypatch):
    """Forced onto the latents it rolled out itself, from the same noise, the generator makes the same video: the
    exposure part's two samples differ only by the context they read."""
    from pipeline.causal import Guidance
    from pipeline.streaming import StreamingPipeline
    from utils.config import load_config

    monkeypatch.chdir(repo_root)
    cfg = load_config(repo_root / "configs" / "toy" / f"{config}.yaml")
    pipe = StreamingPipeline.from_config(cfg, None, False, device="cpu", fast=False)
    guidance = Guidance(pipe.encode(["a red circle moving left slowly", "a cyan square moving up quickly"]))
    noise = torch.randn(2, 9, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    rolled = diagnose.block_latents(pipe, guidance, noise, 0.0, seed=1)
    forced = diagnose.block_latents(pipe, guidance, noise, 0.0, seed=1, context=rolled)
    torch.testing.assert_close(forced, rolled, rtol=0, atol=1e-5)   # float32 on the CPU: the same operations
    other = diagnose.block_latents(pipe, guidance, noise, 0.0, seed=1, context=torch.zeros_like(rolled))
    n = pipe.generator.num_frame_per_block
    assert (other[:, n:] - rolled[:, n:]).abs().max() > 0.1                      # later blocks read the context
    torch.testing.assert_close(other[:, :n], rolled[:, :n], rtol=0, atol=1e-5)   # block 0 reads none


def test_models_part_scores_every_video_of_a_shipped_generator(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    out = tmp_path / "diag.json"
    argv = ["--parts", "models", "--rows", "dmd_chunkwise_4", "--num_clips", "2", "--num_samples", "2", "--batch", "3",
            "--per_video", "--device", "cpu", "--out", str(out)]
    assert diagnose.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"command", "device", "model:dmd_chunkwise_4"}
    row = result["model:dmd_chunkwise_4"]
    agg = row["aggregate"]
    assert agg["count"] == len(row["videos"]) == 4 and agg["count_seen"] + agg["count_heldout"] == 4
    assert [v["prompt"] for v in row["videos"]][::2] == [c for c, _ in diagnose.clips_for(2, 0)]   # 2 per prompt
    low, high = agg["interval95"]["faithfulness"]
    assert low <= agg["faithfulness"] <= high


def test_split_scores_follow_the_training_split():
    from toy.world import format_caption, split_combinations

    train, heldout = split_combinations(seed=0)
    rows = [{"prompt": format_caption(heldout[0]), "faithfulness": 0.25},
            {"prompt": format_caption(train[0]), "faithfulness": 1.0},
            {"prompt": format_caption(train[1]), "faithfulness": 0.5}]
    split = diagnose.split_scores(rows, seed=0)
    assert split["faithfulness_heldout"] == 0.25 and split["count_heldout"] == 1
    assert split["faithfulness_seen"] == 0.75 and split["count_seen"] == 2
    assert split["interval95_heldout"] == (0.25, 0.25)


@pytest.mark.parametrize("argv, names", [
    (["--rows", "dmd_framewise_9"], "--rows dmd_framewise_9"),
    (["--rows", "ar_framewise_50"], "no model for it in assets/toy"),   # a table row, not shipped
    (["--exposure_rows", "nope"], "--exposure_rows nope"),
    (["--workdir", "no/such/dir"], "--workdir no/such/dir"),
    (["--prompts", "no_such_prompts.txt"], "--prompts no_such_prompts.txt"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
])
def test_bad_flags_are_one_line_errors(argv, names, tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    assert diagnose.main([*argv, "--parts", "ceiling", "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and names in err and "\n" not in err
    assert not (tmp_path / "d.json").exists()


def test_compare_pairs_two_result_files_by_prompt(tmp_path):
    """--compare: A minus B per prompt mean, averaged over prompts; frame0_present counted as a rate."""
    def video(prompt, faithful, present):
        return {"prompt": prompt, "faithfulness": faithful, "frame0_present": present}
    a = {"model:x": {"videos": [video("p", 1.0, True), video("p", 0.5, True), video("q", 0.0, False)]}}
    b = {"command": "c", "model:x": {"videos": [video("q", 0.5, False), video("p", 0.25, False)]}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "cmp.json"
    assert diagnose.main(["--compare", str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}:model:x",
                          "--compare_keys", "faithfulness", "frame0_present", "--out", str(out)]) == 0
    diff = json.loads(out.read_text())["differences"]
    # p: 0.75 - 0.25, q: 0.0 - 0.5 -> mean 0.0; frame 0: p 1 - 0, q 0 - 0 -> 0.5
    assert diff["faithfulness"]["difference"] == pytest.approx(0.0) and diff["faithfulness"]["prompts"] == 2
    assert diff["frame0_present"]["difference"] == pytest.approx(0.5)
    assert diagnose.main(["--compare", str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}:model:y",
                          "--out", str(out)]) == 2
    assert diagnose.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--compare_keys", "shape",
                          "--out", str(out)]) == 2
    # a results file that nests such results in groups: GROUP/ENTRY
    (tmp_path / "r.json").write_text(json.dumps({"what": "w", "evaluation_prompts": b}))
    assert diagnose.main(["--compare", str(tmp_path / "a.json"), f"{tmp_path / 'r.json'}:evaluation_prompts/model:x",
                          "--compare_keys", "faithfulness", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["differences"]["faithfulness"]["difference"] == pytest.approx(0.0)
    assert diagnose.main(["--compare", str(tmp_path / "a.json"), f"{tmp_path / 'r.json'}:validation_prompts/model:x",
                          "--out", str(out)]) == 2


def test_by_attribute_averages_each_score_over_the_prompts_asking_for_each_value(tmp_path):
    """--by_attribute: a score's mean over the videos whose prompt names each colour / shape / direction / speed."""
    def video(prompt, present):
        return {"prompt": prompt, "frame0_present": present}
    videos = [video("a red circle moving up slowly", True), video("a red square moving up quickly", False),
              video("an orange circle moving left quickly", False), video("an orange circle moving left quickly", True)]
    (tmp_path / "a.json").write_text(json.dumps({"model:x": {"videos": videos}}))
    out = tmp_path / "by.json"
    assert diagnose.main(["--by_attribute", str(tmp_path / "a.json"), "--compare_keys", "frame0_present",
                          "--out", str(out)]) == 0
    means = json.loads(out.read_text())["by_attribute"][str(tmp_path / "a.json")]["frame0_present"]
    assert means["color"] == {"orange": 0.5, "red": 0.5}
    assert means["shape"] == {"circle": pytest.approx(2 / 3, abs=1e-3), "square": 0.0}
    assert means["direction"] == {"left": 0.5, "up": 0.5}
    assert means["speed"] == {"fast": pytest.approx(1 / 3, abs=1e-3), "slow": 1.0}
    assert diagnose.main(["--by_attribute", str(tmp_path / "a.json"), "--compare_keys", "shape",
                          "--out", str(out)]) == 2          # no such per-video score: one line, exit 2
    assert diagnose.main(["--by_attribute", str(tmp_path / "a.json"), "--compare", str(tmp_path / "a.json"),
                          str(tmp_path / "a.json"), "--out", str(out)]) == 2


def test_frames_part_decodes_the_x0_prediction(tmp_path, repo_root, monkeypatch):
    """The frames part on the shipped base: per timestep a relative x0 error per latent frame, and how often the
    decoded prediction shows the object in frame 0 and later; t = 0 is the VAE's round trip of the clean latents."""
    monkeypatch.chdir(repo_root)
    out = tmp_path / "diag.json"
    argv = ["--parts", "frames", "--rows", "base_50", "--num_clips", "4", "--exposure_clips", "4",
            "--frame_timesteps", "200", "--device", "cpu", "--out", str(out)]
    assert diagnose.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["frames:base_50"]) == {"200"} and len(result["frames:base_50"]["200"]) == 9
    present = result["frame0_x0:base_50"]
    assert set(present) == {"0", "200"}
    assert present["0"]["frame0"] == 1.0                      # the round trip keeps frame 0 (1.00 on 48 clips)
    # little noise: the base's prediction keeps the object (measured on 48 clips: 0.98 frame 0, 0.99 later frames)
    assert present["200"]["frame0"] >= 0.75 and present["200"]["later"] >= 0.9, present
    # the clean latents carry all of frame 0's own channel code; the base's prediction nearly all (48 clips: 0.99 at
    # t = 200, 1.00 from pure noise), a prediction that coded frame 0 as a later frame would give about 0
    assert present["0"]["frame0_code"] == 1.0
    assert 0.8 <= present["200"]["frame0_code"] <= 1.2, present
