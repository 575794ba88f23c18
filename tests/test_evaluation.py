"""The shipped feature network, the evaluation script and the bundled model."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline_ddpm_custom import DDPMCustomPipeline, DDPMCustomScheduler
from training.evaluate import class_histogram, default_batch_size, make_metrics, parse_args, real_images, sample
from training.evaluate import main as evaluate_main
from training.feature_net import FEATURES_DIR, FashionFeatureNet

from .conftest import tiny_pipeline, tiny_unet

ROOT = Path(__file__).resolve().parents[1]


class Tf32Recorder(torch.nn.Module):
    """A stand-in feature net and classifier that notes whether TF32 was allowed when it ran."""

    num_features = 2
    config = type("Config", (), {"num_classes": 2})

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return images.flatten(1)[:, :2].double()

    classify = forward


def test_shipped_feature_net_recognises_fashion_mnist():
    net = FashionFeatureNet.from_pretrained(ROOT / FEATURES_DIR).eval()
    files = sorted((ROOT / "space" / "examples").glob("*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255)[None] for f in files])
    labels = torch.tensor([int(f.name.split("-")[0]) for f in files])
    with torch.no_grad():
        assert (net.classify(images).argmax(1) == labels).sum() >= 8
        assert net(images).shape == (len(files), net.num_features)


def test_evaluate_writes_fid_kid_floor_and_setup(tmp_path):
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "model")
    out = tmp_path / "results.json"
    evaluate_main(["--model", str(tmp_path / "model"), "--num-samples", "40", "--steps", "2", "5", "--eta", "1",
                   "--floor", "--batch-size", "40", "--device", "cpu", "--out", str(out), "--plot", str(tmp_path / "curve.png")])
    results = json.loads(out.read_text())
    assert results["setup"]["extractor"] == "offline" and results["setup"]["num_samples"] == 40
    assert [r["steps"] for r in results["runs"]] == [2, 5]
    # an untrained model is far from the data; two real splits are close
    assert results["floor"]["fid"] < min(r["fid"] for r in results["runs"])
    assert abs(sum(results["runs"][0]["class_histogram"]) - 1) < 1e-6
    saved = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert results["runs"][0]["scheduler"] == {"class": saved["_class_name"],
                                               **{k: saved[k] for k in ("prediction_type", "timestep_spacing", "clip_sample", "thresholding")}}
    # what else decides the numbers: the weights (by content, not folder name), the batch size and the software
    import diffusers
    import torch

    from pipeline_ddpm_custom import DDPMCustomUNet
    from training.digests import weights_digest

    run = results["runs"][0]
    assert run["weights_sha256"] == weights_digest(DDPMCustomUNet.from_pretrained(tmp_path / "model", subfolder="unet"))
    assert run["batch_size"] == 40 and run["software"]["torch"] == torch.__version__
    assert run["software"]["diffusers"] == diffusers.__version__ and run["software"]["pipeline_ddpm_custom"]
    assert Image.open(tmp_path / "curve.png").size[0] > 100


def test_curve_plot_draws_other_weights_dashed_and_refuses_other_sample_counts(tmp_path):
    """--compare LABEL=JSON adds another results file's lines to the plot, one per sampler; a file of another
    sample count is refused (FIDs of different sample counts do not compare), as is a malformed argument."""
    from training.evaluate import plot_curve

    def results(n, fids):
        return {"setup": {"num_samples": n, "extractor": "offline", "reference": "test"}, "floor": {"fid": 1.0},
                "runs": [{"sampler": s, "steps": k, "fid": f} for s, k, f in fids]}

    ours = results(500, [("DDIM", 10, 30.0), ("DDIM", 50, 18.0), ("DDPM ancestral", 50, 25.0)])
    previous = results(500, [("DDIM", 10, 36.0), ("DDIM", 1000, 20.0)])
    fig = plot_curve(ours, str(tmp_path / "curve.png"), compare=[("previous weights", previous)])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["DDIM, previous weights"].get_xdata()) == [10, 1000] and lines["DDIM, previous weights"].get_linestyle() == "--"
    assert lines["DDIM, previous weights"].get_color() == lines["DDIM"].get_color() != lines["DDPM ancestral"].get_color()
    assert Image.open(tmp_path / "curve.png").size[0] > 100
    with pytest.raises(ValueError, match="2000 samples, not 500"):
        plot_curve(ours, str(tmp_path / "bad.png"), compare=[("2k", results(2000, [("DDIM", 50, 9.0)]))])
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--compare", str(tmp_path / "missing.json")])


def test_evaluate_resume_keeps_finished_runs_and_refuses_another_setup(tmp_path):
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "model")
    out = tmp_path / "results.json"
    common = ["--model", str(tmp_path / "model"), "--num-samples", "20", "--eta", "1", "--batch-size", "20",
              "--device", "cpu", "--out", str(out), "--floor"]
    evaluate_main([*common, "--steps", "2"])
    first = json.loads(out.read_text())
    first["runs"][0]["seconds"] = -1.0  # a marker: a re-measured run would overwrite it
    out.write_text(json.dumps(first))
    evaluate_main([*common, "--steps", "2", "3", "--resume"])
    resumed = json.loads(out.read_text())
    assert [(r["steps"], r["seconds"]) for r in resumed["runs"]][0] == (2, -1.0)
    assert [r["steps"] for r in resumed["runs"]] == [2, 3]
    assert resumed["floor"] == first["floor"]
    with pytest.raises(ValueError, match="different setup"):
        evaluate_main([*common, "--steps", "2", "--seed", "1", "--resume"])


class Killed(Exception):
    """What a killed process would not get to see: raised from inside the sampling loop."""


def test_a_killed_row_resumes_from_its_finished_batches(tmp_path, monkeypatch, capsys):
    """A row killed midway keeps its finished batches: --resume samples only the rest and scores exactly what an
    uninterrupted run scores, then deletes them. Nothing is taken without --resume, for another row, or once the
    weights in the model folder have changed."""
    model = tmp_path / "model"
    tiny_pipeline(num_train_timesteps=20).save_pretrained(model)
    common = ["--model", str(model), "--num-samples", "20", "--eta", "1", "--batch-size", "5", "--device", "cpu"]
    out = tmp_path / "row.json"
    evaluate_main([*common, "--steps", "3", "--out", str(tmp_path / "whole.json")])
    whole = json.loads((tmp_path / "whole.json").read_text())["runs"][0]

    calls, kill_after = [], [None]
    real_call = DDPMCustomPipeline.__call__

    def pipeline_call(self, *args, **kwargs):
        if kill_after[0] is not None and len(calls) == kill_after[0]:
            raise Killed
        calls.append(kwargs["generator"][0].initial_seed())  # the batch's first image
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DDPMCustomPipeline, "__call__", pipeline_call)

    def run(*extra, kill=None):
        calls.clear()
        kill_after[0] = kill
        if kill is None:
            evaluate_main([*common, "--out", str(out), *extra])
        else:
            with pytest.raises(Killed):
                evaluate_main([*common, "--out", str(out), *extra])
        return list(calls)

    assert run("--steps", "3", kill=2) == [0, 5]
    assert run("--steps", "3", "--resume") == [10, 15]
    resumed = json.loads(out.read_text())["runs"][0]
    assert (resumed["fid"], resumed["kid"], resumed["class_histogram"]) == (whole["fid"], whole["kid"], whole["class_histogram"])
    assert resumed["batches_from_interrupted_run"] == 2
    assert not os.path.exists(f"{out}.batches")  # the row is saved: its batches are gone

    out.unlink()
    run("--steps", "3", kill=2)
    assert run("--steps", "2", "--resume") == [0, 5, 10, 15]  # another row samples its own
    assert os.path.isdir(f"{out}.batches")  # the interrupted row's batches wait for it
    tiny_pipeline(num_train_timesteps=20, seed=1).save_pretrained(model)
    assert run("--steps", "3", "--resume") == [0, 5, 10, 15]  # new weights under the same name: a new row
    run("--steps", "3", kill=2)
    capsys.readouterr()
    assert run("--steps", "3") == [0, 5, 10, 15]  # without --resume every row starts over, and says what it deleted
    assert f"Deleted the sample batches of an interrupted run in {out}.batches" in capsys.readouterr().out


def test_evaluate_with_a_diffusers_solver_samples_what_that_solver_samples(tmp_path):
    """--scheduler swaps in one of diffusers' multistep solvers built from the model's scheduler config (so
    v-prediction and the beta schedule carry over): the images scored are those of the pipeline with that
    scheduler set by hand, and the run says which solver and spacing produced them; a resumed file keeps a
    run of another spacing apart; an eta for a solver that takes none is refused, even 0."""
    from diffusers import DPMSolverMultistepScheduler

    from pipeline_ddpm_custom import DDPMCustomScheduler
    from training.evaluate import use_scheduler

    from .conftest import tiny_unet

    DDPMCustomPipeline(tiny_unet(), DDPMCustomScheduler(num_train_timesteps=20, prediction_type="v_prediction")).save_pretrained(
        tmp_path / "model")
    pipe = DDPMCustomPipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    by_hand = DDPMCustomPipeline.from_pretrained(tmp_path / "model")
    by_hand.scheduler = DPMSolverMultistepScheduler.from_config(by_hand.scheduler.config, algorithm_type="sde-dpmsolver++",
                                                                timestep_spacing="trailing")
    by_hand.set_progress_bar_config(disable=True)
    use_scheduler(pipe, "sde-dpmsolver++", "trailing")
    ours = sample(pipe, 6, 4, 0.0, 3, 3, 1.0)
    reference = sample(by_hand, 6, 4, 0.0, 3, 3, 1.0)
    torch.testing.assert_close(ours, reference)
    assert not torch.allclose(ours, sample(pipe, 6, 4, 0.0, 4, 3, 1.0))  # the solver's noise follows the seeds

    out = tmp_path / "results.json"
    common = ["--model", str(tmp_path / "model"), "--num-samples", "12", "--steps", "3", "--batch-size", "12",
              "--device", "cpu", "--out", str(out), "--scheduler", "sde-dpmsolver++", "--resume"]
    evaluate_main([*common, "--timestep-spacing", "trailing"])
    evaluate_main([*common, "--timestep-spacing", "linspace"])
    evaluate_main([*common, "--timestep-spacing", "linspace"])  # already there: nothing added
    runs = json.loads(out.read_text())["runs"]
    assert [(r["sampler"], r["eta"], r["scheduler"]["class"], r["scheduler"]["timestep_spacing"]) for r in runs] == [
        ("SDE-DPM-Solver++ 2M", None, "DPMSolverMultistepScheduler", "trailing"),
        ("SDE-DPM-Solver++ 2M", None, "DPMSolverMultistepScheduler", "linspace")]
    assert runs[0]["scheduler"]["prediction_type"] == "v_prediction"
    for eta in ("1", "0"):  # 0 too: a solver ignores any eta, so asking for one is a mistake worth saying
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", "--scheduler", "unipc", "--eta", eta])
    assert parse_args(["--model", "m"]).eta == [0.0]


def test_resume_tells_runs_apart_by_sampler_steps_and_spacing():
    from training.evaluate import already_measured

    runs = [{"sampler": "DDIM", "steps": 50},  # from a file older than the recorded scheduler settings
            {"sampler": "SDE-DPM-Solver++ 2M", "steps": 50, "scheduler": {"timestep_spacing": "trailing"}}]
    assert already_measured(runs, "DDIM", 50, "leading") and not already_measured(runs, "DDIM", 25, "leading")
    assert already_measured(runs, "SDE-DPM-Solver++ 2M", 50, "trailing")
    assert not already_measured(runs, "SDE-DPM-Solver++ 2M", 50, "linspace")
    assert not already_measured(runs, "DPM-Solver++ 2M", 50, "trailing")


def test_results_file_survives_a_write_that_fails_halfway(tmp_path):
    """The results that --resume keeps are replaced whole or not at all: a dump that dies midway (here on a
    value JSON cannot hold, after the first keys are written) leaves the previous file as it was, and no stray file."""
    from training.evaluate import write_json_atomically

    out = tmp_path / "results.json"
    write_json_atomically(str(out), {"runs": [{"steps": 50, "fid": 9.12}]})
    with pytest.raises(TypeError):
        write_json_atomically(str(out), {"runs": [{"steps": 50, "fid": 9.12}], "later": object()})
    assert json.loads(out.read_text()) == {"runs": [{"steps": 50, "fid": 9.12}]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_unconditional_evaluation_samples_the_null_class_a_user_gets_without_labels(tmp_path):
    pipe = tiny_pipeline(num_train_timesteps=20, num_class_embeds=3)
    pipe.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num-samples", "6", "--steps", "2", "--eta", "0",
              "--batch-size", "6", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning about sampling without labels
        without = sample(pipe, 6, 2, 0.0, 0, 6, 1.0, unconditional=True)
    with pytest.warns(UserWarning, match="null class"):
        by_hand = pipe(batch_size=6, generator=[torch.Generator().manual_seed(i) for i in range(6)], num_inference_steps=2,
                       eta=0.0, output_type="pt").images  # no class_labels, as a user would call it
    torch.testing.assert_close(without, by_hand)
    assert not torch.allclose(without, sample(pipe, 6, 2, 0.0, 0, 6, 1.0))  # labelled samples differ
    results = evaluate_main([*common, "--unconditional", "--out", str(tmp_path / "null.json")])
    assert results["setup"]["unconditional"] is True
    labelled = evaluate_main([*common, "--out", str(tmp_path / "labelled.json")])
    assert "unconditional" not in labelled["setup"]  # files written before the option still resume
    assert results["runs"][0]["fid"] != labelled["runs"][0]["fid"]
    with pytest.raises(SystemExit):
        parse_args([*common, "--unconditional", "--guidance-scale", "2"])
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="unconditional model.*drop --unconditional"):
        evaluate_main(["--model", str(tmp_path / "plain"), *common[2:], "--unconditional"])


def test_guidance_interval_evaluation_scores_the_pipelines_interval_guided_samples(tmp_path, capsys):
    """--guidance-interval: evaluate scores exactly the images of the pipeline called with guidance_interval (here
    t = 10 and 5 of the chain 15, 10, 5, 0 guided), which differ from guidance at every step; the setup records the
    interval (absent without it, so older files resume); an interval without guidance, or upside down, is refused."""
    from training.evaluate import load_extractor, reference_metrics, score_images

    pipe = tiny_pipeline(num_train_timesteps=20, num_class_embeds=3)
    pipe.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num-samples", "6", "--steps", "4", "--eta", "0",
              "--batch-size", "6", "--device", "cpu", "--guidance-scale", "3"]
    by_hand = pipe(batch_size=6, generator=[torch.Generator().manual_seed(i) for i in range(6)], num_inference_steps=4,
                   eta=0.0, class_labels=[i % 3 for i in range(6)], guidance_scale=3.0, guidance_interval=(5, 12),
                   output_type="pt").images
    torch.testing.assert_close(sample(pipe, 6, 4, 0.0, 0, 6, 3.0, guidance_interval=(5, 12)), by_hand)
    assert not torch.allclose(sample(pipe, 6, 4, 0.0, 0, 6, 3.0), by_hand, atol=0.01)  # every step guided: others

    results = evaluate_main([*common, "--guidance-interval", "5", "12", "--out", str(tmp_path / "interval.json")])
    assert results["setup"]["guidance_interval"] == [5, 12]
    extractor = load_extractor("offline", torch.device("cpu"))
    fid, kid = reference_metrics(extractor, 6, 0, torch.device("cpu"))
    assert results["runs"][0]["fid"] == pytest.approx(score_images(fid, kid, by_hand, extractor)["fid"], rel=1e-6)
    everywhere = evaluate_main([*common, "--out", str(tmp_path / "everywhere.json")])
    assert "guidance_interval" not in everywhere["setup"] and everywhere["runs"][0]["fid"] != results["runs"][0]["fid"]
    for bad, message in ([*common[:-2], "--guidance-interval", "5", "12"], "give both"),  \
                        ([*common, "--guidance-interval", "12", "5"], "LOWEST <= HIGHEST"):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--steps", "50", "0"], "positive counts"), (["--batch-size", "0"], "positive counts"),
                                           (["--eta", "0", "2"], "values in [0, 1]"), (["--guidance-scale", "0.5"], "must be >= 1")])
def test_evaluate_refuses_out_of_range_options_before_loading_anything(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(["--model", "no-such-model", *argv])
    assert message in capsys.readouterr().err


def test_evaluate_refuses_more_steps_than_the_model_has_before_reference_features(tmp_path, monkeypatch):
    import training.evaluate as evaluate

    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "short")
    monkeypatch.setattr(evaluate, "load_extractor", lambda *a: pytest.fail("reached the features"))
    with pytest.raises(ValueError, match="trained with 20 timesteps, so --steps goes up to 20; got 25"):
        evaluate.main(["--model", str(tmp_path / "short"), "--num-samples", "4", "--steps", "10", "25", "--device", "cpu"])


def test_evaluate_batch_size_follows_the_device_unless_given():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_batch_size(cpu) < default_batch_size(cuda)  # two cores are fastest with small batches
    assert parse_args(["--model", "m", "--device", "cpu"]).batch_size == default_batch_size(cpu)
    assert parse_args(["--model", "m", "--device", "cuda"]).batch_size == default_batch_size(cuda)
    assert parse_args(["--model", "m", "--device", "cpu", "--batch-size", "7"]).batch_size == 7


def test_bundled_model_loads_without_the_package_and_generates(tmp_path):
    code = ("import sys; sys.modules['pipeline_ddpm_custom'] = None\n"
            "import torch; from diffusers import DiffusionPipeline\n"
            f"pipe = DiffusionPipeline.from_pretrained({str(ROOT / 'models' / 'ddpm-fashion-mnist')!r}, trust_remote_code=True)\n"
            "pipe.set_progress_bar_config(disable=True)\n"
            "out = pipe(batch_size=2, num_inference_steps=3, class_labels=[1, 7], output_type='np').images\n"
            "print(out.shape, pipe.unet.config.num_class_embeds, pipe.unet.dtype)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2, 28, 28, 1) 10 torch.float32" in result.stdout


def test_bundled_model_carries_the_current_library_code():
    """The remote-code copies beside the bundled weights must be today's library files."""
    bundled = ROOT / "models" / "ddpm-fashion-mnist"
    for copy in ("pipeline_ddpm_custom.py", "unet/unet_ddpm_custom.py", "scheduler/scheduling_ddpm_custom.py"):
        source = ROOT / "pipeline_ddpm_custom" / Path(copy).name
        assert (bundled / copy).read_text() == source.read_text(), (
            f"{copy} is stale: refresh with `python -c \"import torch; from pipeline_ddpm_custom import DDPMCustomPipeline as P; "
            f"P.from_pretrained('{bundled.relative_to(ROOT)}', dtype=torch.float16)"
            f".save_pretrained('{bundled.relative_to(ROOT)}')\"`"
        )


def test_bundled_model_card_carries_its_hand_written_notes():
    """The card's hand-written part lives in models/ddpm-fashion-mnist.card-notes.md (bundle_model.py's
    --card-notes); an edit made to only one of the two copies is caught here."""
    notes = (ROOT / "models" / "ddpm-fashion-mnist.card-notes.md").read_text().strip()
    card = (ROOT / "models" / "ddpm-fashion-mnist" / "README.md").read_text()
    assert card.rstrip().endswith(notes), "the bundled card and card-notes.md differ: copy the edit into both"


def test_in_training_fid_matches_the_evaluate_script_and_caches_its_reference(tmp_path):
    """--eval_steps logs the same FID that training.evaluate computes for the exported model, and the
    reference statistics are computed once: a resumed run reuses the cached file."""
    from .test_training import run_training

    out = tmp_path / "run"
    evaluation = ["--eval_steps", "2", "--eval_num_samples", "8", "--eval_inference_steps", "2", "--checkpointing_steps", "2"]
    run_training(out, "--max_train_steps", "2", *evaluation)
    cache = out / "logs" / "fid_reference.pt"
    first_write = cache.stat().st_mtime_ns
    run_training(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *evaluation)
    assert cache.stat().st_mtime_ns == first_write
    records = [json.loads(line) for line in (out / "logs" / "fid.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["fid"] > 0 for r in records)

    results = evaluate_main(["--model", str(out), "--num-samples", "8", "--steps", "2", "--eta", "0", "--seed", "0",
                             "--device", "cpu"])
    assert abs(results["runs"][0]["fid"] - records[-1]["fid"]) < 1e-3 * records[-1]["fid"]


def test_bundle_model_writes_a_small_loadable_folder_with_pictures_and_card(tmp_path):
    from safetensors.torch import load_file

    from training.bundle_model import main as bundle_main

    source = tmp_path / "export"
    pipe = tiny_pipeline(num_train_timesteps=20, num_class_embeds=3)
    pipe.save_pretrained(source)
    (source / "training_config.json").write_text(json.dumps({"num_classes": 3, "dataset_name": None, "class_conditional": True,
                                                             "class_names": ["cat", "dog", "emu"]}))
    evaluation = {"setup": {"extractor": "offline", "num_samples": 40, "reference": "fashion-mnist test (10000 images)"},
                  "floor": {"fid": 1.5}, "runs": [{"sampler": "DDIM", "steps": 5, "fid": 12.25, "class_histogram": [0.3, 0.3, 0.4]}]}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    target = tmp_path / "bundled"
    target.mkdir()
    (target / "stale.txt").write_text("the old bundle is replaced, not merged")
    (tmp_path / "notes.md").write_text("## History\n\nFine-tuned twice; the earlier bundle gave 99.5.\n")
    bundle_main([str(source), str(target), "--evaluation", str(tmp_path / "eval.json"), "--steps", "5",
                 "--trained-on", "a test", "--card-notes", str(tmp_path / "notes.md")])

    assert not (target / "stale.txt").exists()
    weights = load_file(str(target / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float16}
    loaded = DDPMCustomPipeline.from_pretrained(target)
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], value.half().float())
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "emu"}  # an export from before id2label: named from its record
    assert 'The classes: 0 cat, 1 dog, 2 emu; `class_labels` also takes their names (e.g. `class_labels="emu"`)' in (
        target / "README.md").read_text()
    assert Image.open(target / "samples.png").size[0] >= 8 * 8 and Image.open(target / "denoising.gif").n_frames > 2
    card = (target / "README.md").read_text()
    assert "12.25" in card and "1.50" in card and "zalando-datasets/fashion_mnist" in card and "denoising.gif" in card
    assert card.index("## Metrics") < card.index("## History") and "the earlier bundle gave 99.5." in card
    assert json.loads((target / "training_config.json").read_text())["trained_on"] == "a test"

    with pytest.raises(SystemExit):  # a mistyped notes path stops before the old bundle is touched
        bundle_main([str(source), str(target), "--card-notes", str(tmp_path / "missing.md")])
    assert "the earlier bundle gave 99.5." in (target / "README.md").read_text()


def test_bundle_model_draws_and_documents_the_guidance_it_is_given(tmp_path):
    """--guidance-scale/--guidance-interval reach the pictures, the card's example (which runs as written, through
    remote code, and gives the guided pipeline's images) and the card's metrics rows; a model without classes, or
    an interval without a scale, is refused before the old bundle is touched."""
    from training.bundle_model import main as bundle_main
    from pipeline_ddpm_custom.labels import cycling_class_labels
    from pipeline_ddpm_custom.pictures import grid

    source, target = tmp_path / "export", tmp_path / "bundled"
    pipe = tiny_pipeline(num_train_timesteps=20, num_class_embeds=3)
    pipe.save_pretrained(source)
    (source / "training_config.json").write_text(json.dumps({"num_classes": 3, "dataset_name": None}))
    guided_run = {"setup": {"extractor": "inception", "num_samples": 40, "reference": "fashion-mnist test (40 images)",
                            "guidance_scale": 2.0,
                            "guidance_interval": [5, 15]}, "floor": {"fid": 1.25, "draw": "class-balanced"},
                  "runs": [{"sampler": "DDIM", "steps": 5, "fid": 7.75, "class_histogram": [0.3, 0.3, 0.4]}]}
    unguided_run = {"setup": {**guided_run["setup"], "guidance_scale": 1.0, "extractor": "offline"}, "floor": {"fid": 1.5},
                    "runs": [{"sampler": "DDIM", "steps": 5, "fid": 9.5, "class_histogram": [0.3, 0.3, 0.4]}]}
    del unguided_run["setup"]["guidance_interval"]
    (tmp_path / "guided.json").write_text(json.dumps(guided_run))
    (tmp_path / "unguided.json").write_text(json.dumps(unguided_run))
    bundle_main([str(source), str(target), "--steps", "5", "--guidance-scale", "2", "--guidance-interval", "5", "15",
                 "--evaluation", str(tmp_path / "unguided.json"), str(tmp_path / "guided.json"), "--repo-id", str(target)])

    def pictures(**guidance):
        images = pipe(batch_size=16, generator=[torch.Generator().manual_seed(i) for i in range(16)], num_inference_steps=5,
                      eta=0.0, class_labels=cycling_class_labels(range(16), 3), **guidance).images
        return np.asarray(grid(images, cols=8))

    drawn = np.asarray(Image.open(target / "samples.png"))
    np.testing.assert_array_equal(drawn, pictures(guidance_scale=2.0, guidance_interval=(5, 15)))
    assert not np.array_equal(drawn, pictures())

    card = (target / "README.md").read_text()
    rows = dict(line.strip("| ").split(" | ") for line in card.split("## Metrics")[1].splitlines() if line.startswith("| FID"))
    where = "offline features, 40 samples vs fashion-mnist test (40 images)"
    inception = where.replace("offline", "inception")
    assert rows == {f"FID real vs real (floor; {where})": "1.50",
                    f"FID DDIM, 5 steps ({where})": "9.50 (class shares 30.0%..40.0%)",
                    f"FID real vs real (class-balanced floor; {inception})": "1.25",
                    f"FID DDIM, 5 steps, classifier-free guidance 2 only at t = 5-15 ({inception})":
                        "7.75 (class shares 30.0%..40.0%)"}
    from huggingface_hub import ModelCard  # the same numbers as model-index metadata, read back by the Hub's parser

    indexed = {r.metric_name: (r.metric_type, r.metric_value, r.dataset_type, r.dataset_split)
               for r in ModelCard.load(target / "README.md").data.eval_results}
    assert indexed == {  # typed by extractor: only Inception FIDs are "fid", the scale leaderboards compare
        "FID, DDIM 5 steps (offline features, 40 samples; real-vs-real floor 1.50)":
            ("fid-offline", 9.5, "zalando-datasets/fashion_mnist", "test"),
        "FID, DDIM 5 steps, classifier-free guidance 2 only at t = 5-15 (inception features, 40 samples; class-balanced "
        "real-vs-real floor 1.25)": ("fid", 7.75, "zalando-datasets/fashion_mnist", "test")}
    example = card.split("```python\n")[1].split("```")[0]
    assert "guidance_scale=2, guidance_interval=(5, 15)," in example
    code = example + "import numpy\nnumpy.save('example.npy', numpy.stack([numpy.asarray(i) for i in images]))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    bundled = DDPMCustomPipeline.from_pretrained(target)
    bundled.set_progress_bar_config(disable=True)
    by_hand = bundled(batch_size=16, num_inference_steps=5, eta=0.0, class_labels=[i % 3 for i in range(16)],
                      guidance_scale=2.0, guidance_interval=(5, 15), generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(np.load(tmp_path / "example.npy"), np.stack([np.asarray(i) for i in by_hand]))

    before = card
    unconditional = tmp_path / "unconditional"
    tiny_pipeline(num_train_timesteps=20).save_pretrained(unconditional)
    (unconditional / "training_config.json").write_text(json.dumps({"dataset_name": None}))
    for refused in ([str(unconditional), str(target), "--guidance-scale", "2"],
                    [str(source), str(target), "--guidance-interval", "5", "15"]):
        with pytest.raises(SystemExit):
            bundle_main(refused)
    assert (target / "README.md").read_text() == before


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_x0_error_diagnostic_is_zero_for_an_oracle_and_large_for_a_wrong_model(prediction_type):
    """benchmarks/x0_error_by_timestep.py converts each prediction type back to x0 correctly: a UNet
    that returns the true target scores ~0 at every t; one that returns zeros does not."""
    from types import SimpleNamespace

    from pipeline_ddpm_custom import DDPMCustomScheduler

    from x0_error_by_timestep import x0_errors

    scheduler = DDPMCustomScheduler(prediction_type=prediction_type)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    x0[:, :, :2] = -1  # a black background strip, scored on its own too

    def oracle(x_t, t, class_labels=None, shift=0.0):  # shift: a model that sees every image `shift` brighter
        abar = scheduler.alphas_cumprod[t].float()[:, None, None, None]
        believed = x0 + shift
        eps = (x_t - abar.sqrt() * believed) / (1 - abar).sqrt()
        target = {"epsilon": eps, "sample": believed,
                  "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * believed}[prediction_type]
        return SimpleNamespace(sample=target)

    rows = x0_errors(SimpleNamespace(unet=oracle, scheduler=scheduler), x0, None)
    assert [r["t"] for r in rows][-1] == 999 and max(r["x0_mse"] for r in rows) < 1e-6
    assert max(r["x0_mse_background"] for r in rows) < 1e-6
    assert max(abs(r["x0_mean_error"]) for r in rows) < 1e-4
    brighter = x0_errors(SimpleNamespace(unet=lambda *a, **k: oracle(*a, **k, shift=0.05), scheduler=scheduler), x0, None)
    assert [r["x0_mean_error"] for r in brighter] == pytest.approx([0.05] * len(rows), abs=1e-3)
    zeros = SimpleNamespace(unet=lambda x_t, t, class_labels=None: SimpleNamespace(sample=torch.zeros_like(x_t)), scheduler=scheduler)
    wrong = x0_errors(zeros, x0, None)
    assert max(r["x0_mse"] for r in wrong) > 0.1 and max(r["x0_mse_background"] for r in wrong) > 0.1


def test_background_haze_measures_faint_pixels_and_their_cost(tmp_path):
    """benchmarks/background_haze.py: its pixel bands agree with a count on the raw IDX bytes, pixel noise
    raises the offline FID (the yardstick it calibrates), and the diagnostic blackens faint pixels only."""
    from background_haze import as_saved, dehaze, far_from_garment, main as haze_main, pixel_shares
    from scipy import ndimage
    from diffusers.image_processor import VaeImageProcessor

    from training import data

    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "model")
    results = haze_main(["--model", str(tmp_path / "model"), "--num-samples", "300", "--steps", "3",
                         "--noise-levels", "0", "16", "--renoise-timesteps", "5", "15", "--trajectory-every", "2",
                         "--device", "cpu", "--out", str(tmp_path / "haze.json")])
    assert json.loads((tmp_path / "haze.json").read_text())["setup"]["num_samples"] == 300
    # the same 300 train images, counted from the IDX file directly: all black pixels and the faint 1-3 band
    raw = data.read_idx(os.path.join(data.FASHION_MNIST_IDX, "train-images-idx3-ubyte.gz"))
    picked = raw[np.random.default_rng(1).permutation(len(raw))[:300]]
    real = results["pixels"]["real"]
    assert real["black (<0.5)"] == pytest.approx((picked == 0).mean(), abs=1e-6)
    assert real["1-3"] == pytest.approx(((picked >= 1) & (picked <= 3)).mean(), abs=1e-6)
    assert sum(real.values()) == pytest.approx(1.0, abs=1e-6)
    # the far background: pixels more than 4 px from every pixel over 30 gray levels, found here by scipy's max filter
    far = ndimage.maximum_filter((picked > 30).astype(np.uint8), size=(1, 9, 9), mode="constant") == 0
    real_far = results["pixels_far_background"]["real"]
    assert real_far["share_of_pixels"] == pytest.approx(far.mean(), abs=1e-6)
    assert real_far["black (<0.5)"] == pytest.approx((picked[far] == 0).mean(), abs=1e-6)
    assert real_far["mean_gray_level"] == pytest.approx(picked[far].mean(), abs=1e-4)
    assert results["setup"]["far_distance"] == 4 and "share_of_pixels" in results["pixels_far_background"]["samples"]
    clean, noisy = results["noise_calibration"]
    assert noisy["fid"] > 2 * clean["fid"] and noisy["pixels"]["black (<0.5)"] < real["black (<0.5)"]
    # one bright pixel: everything within 2 px of it (a 5x5 square) is near, the rest far
    dot = torch.zeros(1, 1, 28, 28)
    dot[0, 0, 10, 20] = 1.0
    mask = far_from_garment(dot, 2, 30)
    assert (~mask).sum() == 25 and not mask[0, 0, 8:13, 18:23].any() and mask[0, 0, 7, 20] and mask[0, 0, 10, 23]
    # the diagnostic only ever blackens faint pixels
    images = real_images("train", 300, 1, torch.device("cpu"))
    assert torch.equal(dehaze(images, 16)[images * 255 >= 16], images[images * 255 >= 16])
    assert pixel_shares(dehaze(images, 16))["4-15"] == 0
    # the 8-bit row scores what diffusers' PIL output holds, pixel for pixel, and leaves 8-bit images as they are
    floats = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    pil = VaeImageProcessor.numpy_to_pil(floats.permute(0, 2, 3, 1).numpy())
    assert torch.equal(as_saved(floats) * 255, torch.from_numpy(np.stack([np.asarray(p) for p in pil])).float().unsqueeze(1))
    assert not torch.equal(as_saved(floats), floats) and torch.equal(as_saved(images), images)
    assert "fid" in results["samples_8bit"]
    assert [row["t"] for row in results["renoised_far_background"]["samples"]] == [5, 15]
    # the x0 trajectory: every 2nd step and the last, at the scheduler's timesteps
    from pipeline_ddpm_custom import DDPMCustomScheduler

    chain = DDPMCustomScheduler.from_pretrained(tmp_path / "model", subfolder="scheduler")
    chain.set_timesteps(3)
    trajectory = results["x0_trajectory_far_background"]
    assert [(row["step"], row["t"]) for row in trajectory] == [(0, int(chain.timesteps[0])), (2, int(chain.timesteps[2]))]


def test_x0_trajectory_follows_the_prediction_to_the_finished_sample():
    """background_haze's X0Trajectory keeps every batch's x0 prediction at the chosen steps; DDIM's last step
    returns its x0 prediction, so the last row summarises the finished samples (as 8-bit levels), while the first
    step's prediction is another image."""
    from background_haze import X0Trajectory, as_saved, masked_summary

    pipe = tiny_pipeline(num_train_timesteps=20)
    trajectory = X0Trajectory(every=3)
    batches = [pipe(batch_size=3, num_inference_steps=4, eta=0.0, output_type="pt", generator=torch.Generator().manual_seed(seed),
                    callback_on_step_end=trajectory, callback_on_step_end_tensor_inputs=["pred_original_sample"]).images
               for seed in (0, 1)]
    samples = torch.cat(batches)
    everywhere = torch.ones_like(samples, dtype=torch.bool)
    rows = trajectory.far_background(everywhere)
    assert [row["step"] for row in rows] == [0, 3] and [row["t"] for row in rows] == [int(t) for t in pipe.scheduler.timesteps[[0, 3]]]
    expected = masked_summary(as_saved(samples), everywhere)
    assert {k: v for k, v in rows[-1].items() if k not in ("step", "t")} == pytest.approx(expected, abs=1e-5)
    assert not torch.equal(torch.cat(trajectory.kept[0]), torch.cat(trajectory.kept[3]))


def test_background_haze_samples_with_a_solver_and_refuses_an_eta_for_it(tmp_path):
    """--scheduler swaps in one of diffusers' solvers for the sampling (recorded in the setup) while the
    re-noise rows keep the model's own scheduler; an --eta with a solver is an error, not silently dropped."""
    from background_haze import main as haze_main

    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num-samples", "20", "--steps", "3", "--noise-levels", "0",
              "--renoise-timesteps", "5", "--device", "cpu"]
    results = haze_main(common + ["--scheduler", "sde-dpmsolver++"])
    assert results["setup"]["sampler"] == "SDE-DPM-Solver++ 2M" and results["setup"]["eta"] is None
    assert results["setup"]["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert [row["t"] for row in results["renoised_far_background"]["real"]] == [5]
    assert results["x0_trajectory_far_background"] == [] and results["setup"]["trajectory_every"] == 0
    with pytest.raises(SystemExit):
        haze_main(common + ["--scheduler", "sde-dpmsolver++", "--eta", "0.5"])
    with pytest.raises(SystemExit):  # a solver reports no x0 prediction to follow
        haze_main(common + ["--scheduler", "sde-dpmsolver++", "--trajectory-every", "5"])
    with pytest.raises(SystemExit):
        haze_main(common + ["--trajectory-every", "-1"])


def test_renoised_background_reports_what_the_model_predicts_there():
    """background_haze's re-noise diagnostic: for a v-predicting 'model' whose x0 prediction is the clean image
    plus a 3-gray-level haze, the far background comes back 3 gray levels brighter than it went in, whatever the
    noise, and none of it black; the model is asked with its null class; a timestep it lacks is refused."""
    from types import SimpleNamespace

    from background_haze import far_from_garment, renoised_far_background

    from pipeline_ddpm_custom import DDPMCustomScheduler

    images = real_images("train", 64, 1, torch.device("cpu"))
    scheduler = DDPMCustomScheduler(prediction_type="v_prediction")
    hazy_x0 = images * 2 - 1 + 6 / 255  # +3 gray levels of 255

    def unet(x_t, t, class_labels=None):
        assert class_labels is not None and (class_labels == 10).all()
        abar = scheduler.alphas_cumprod[t].float()[:, None, None, None]
        eps = (x_t - abar.sqrt() * hazy_x0) / (1 - abar).sqrt()
        return SimpleNamespace(sample=abar.sqrt() * eps - (1 - abar).sqrt() * hazy_x0)

    unet.config, unet.dtype = SimpleNamespace(num_class_embeds=10), torch.float32
    far = far_from_garment(images, 4, 30)
    expected = float((images * 255)[far].mean()) + 3  # the far background is mostly, not only, black
    for t in (0, 100, 500):
        row = renoised_far_background(unet, scheduler, images, t, seed=0, distance=4, garment_level=30,
                                      batch_size=len(images))
        assert row["t"] == t and row["mean_gray_level"] == pytest.approx(expected, abs=1e-3)
        assert row["black (<0.5)"] == 0 and row["1-3"] > 0.99
    with pytest.raises(ValueError, match="0..999"):
        renoised_far_background(unet, scheduler, images, 1000, seed=0, distance=4, garment_level=30)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_epsilon_scaling_matches_diffusers_ddim_fed_the_scaled_noise(prediction_type):
    """benchmarks/epsilon_scaling.py: a DDIM step on the rescaled output of any prediction type equals
    diffusers' epsilon DDIMScheduler stepping with eps / lambda, eps taken from diffusers' own x0."""
    from diffusers import DDIMScheduler

    from pipeline_ddpm_custom import DDPMCustomScheduler

    from epsilon_scaling import scale_epsilon

    ours = DDPMCustomScheduler(prediction_type=prediction_type)
    kind_ddim = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    eps_ddim = DDIMScheduler(prediction_type="epsilon", clip_sample=False)
    for scheduler in (kind_ddim, eps_ddim):
        scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    for t in kind_ddim.timesteps[[0, 25, 49]]:
        x_t, output = torch.randn(2, 1, 8, 8, generator=generator), torch.randn(2, 1, 8, 8, generator=generator)
        abar = kind_ddim.alphas_cumprod[t]
        x0 = kind_ddim.step(output, t, x_t, eta=0.0).pred_original_sample
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        expected = eps_ddim.step(eps / 1.01, t, x_t, eta=0.0).prev_sample
        scaled = kind_ddim.step(scale_epsilon(ours, output, x_t, t, 1.01), t, x_t, eta=0.0).prev_sample
        torch.testing.assert_close(scaled, expected, rtol=1e-4, atol=1e-4)
        if t > 0:  # at t = 0 the step returns x0, which sqrt(1 - abar_0) = 0.01 leaves almost untouched
            assert not torch.allclose(kind_ddim.step(output, t, x_t, eta=0.0).prev_sample, expected, atol=1e-3)


def test_epsilon_scaling_benchmark_patches_only_inside_its_block(tmp_path):
    """The context manager changes the pipeline's samples only while it is open (scale 1 changes nothing),
    and the script writes one scored run per scale."""
    from epsilon_scaling import epsilon_scaled, main as scaling_main

    pipe = tiny_pipeline(num_train_timesteps=20)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe(batch_size=2, num_inference_steps=4, eta=0.0, generator=torch.Generator().manual_seed(0), output_type="pt").images

    plain = draw()
    with epsilon_scaled(pipe, 1.0):
        torch.testing.assert_close(draw(), plain)
    with epsilon_scaled(pipe, 1.2):
        scaled = draw()
    assert not torch.allclose(scaled, plain, atol=1e-3)
    torch.testing.assert_close(draw(), plain)
    # --below T: only the steps at t < T (the 4-step chain here is t = 15, 10, 5, 0)
    with epsilon_scaled(pipe, 1.2, below=20):
        torch.testing.assert_close(draw(), scaled)
    with epsilon_scaled(pipe, 1.2, below=1):  # t = 0 only: the last step, which returns x0
        last_only = draw()
    assert not torch.allclose(last_only, plain, atol=1e-4) and not torch.allclose(last_only, scaled, atol=1e-3)
    with epsilon_scaled(pipe, 1.2, below=11):
        late = draw()
    assert not torch.allclose(late, last_only, atol=1e-4) and not torch.allclose(late, scaled, atol=1e-3)
    pipe.save_pretrained(tmp_path / "model")
    results = scaling_main(["--model", str(tmp_path / "model"), "--num-samples", "64", "--steps", "2",
                            "--scales", "1", "1.2", "--below", "20", "--device", "cpu", "--out", str(tmp_path / "scaling.json")])
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert [run["scale"] for run in saved["runs"]] == [1.0, 1.2] and saved == json.loads(json.dumps(results))
    assert all(run["below"] == 20 for run in saved["runs"])
    assert all(run["fid"] > 0 and sum(run["pixels"].values()) == pytest.approx(1.0, abs=1e-6) for run in saved["runs"])
    with pytest.raises(SystemExit):
        scaling_main(["--model", str(tmp_path / "model"), "--below", "0"])


def test_brightness_headroom_scales_garments_and_matches_each_class_to_the_training_images(tmp_path):
    """benchmarks/brightness_headroom.py: a gain keeps black black and clamps at white; samples drawn at 0.9 of the
    real images' brightness get each class's gain 1/0.9 back; gains far from 1 raise the real images' FID (the
    operation's cost), and the script writes one scored run per gain and the per-class one."""
    from brightness_headroom import brightened, main as headroom_main, matched_gains, tone_shares

    images = torch.tensor([0.0, 0.5, 0.99]).view(3, 1, 1, 1)
    torch.testing.assert_close(brightened(images, 1.04).view(-1), torch.tensor([0.0, 0.52, 1.0]))
    # gray levels 0, 127.5 (rounds to 128), 252.45 and 255: one pixel each in black, 128-191, 240-254 and 255
    tones = tone_shares(torch.cat([images, brightened(images[2:], 1.04)]))
    assert tones == {"black": 0.25, "1-15": 0.0, "16-63": 0.0, "64-127": 0.0, "128-191": 0.25, "192-239": 0.0,
                     "240-254": 0.25, "255": 0.25}
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(40, 1, 6, 6, generator=generator) * 0.6 + 0.3  # every pixel garment, at any gain here
    labels = torch.arange(40) % 10
    darker = real * torch.where(labels < 5, 0.9, 0.8).view(-1, 1, 1, 1)
    gains = matched_gains(darker, labels, real, labels, 10)
    torch.testing.assert_close(gains, torch.where(torch.arange(10) < 5, 1 / 0.9, 1 / 0.8))


    tiny_pipeline(num_train_timesteps=20, num_class_embeds=10).save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--steps", "2", "--device", "cpu"]
    results = headroom_main(common + ["--num-samples", "100", "--gains", "1", "1.5", "--out", str(tmp_path / "h.json")])
    saved = json.loads((tmp_path / "h.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [run["gain"] for run in saved["runs"]] == [1.0, 1.5, "per-class matched"]
    assert saved["runs"][1]["real"]["fid"] > saved["runs"][0]["real"]["fid"]  # real images lose by the gain
    tones = [run["tones"]["real"] for run in saved["runs"][:2]]
    assert tones[1]["255"] > tones[0]["255"] and tones[1]["black"] == tones[0]["black"]
    assert all(sum(run["tones"][side].values()) == pytest.approx(1.0, abs=1e-6)
               for run in saved["runs"][:2] for side in ("samples", "real"))
    assert len(saved["runs"][2]["class_gains"]) == 10 and saved["runs"][2]["samples"]["fid"] > 0
    assert len(saved["garment_gray_by_class"]["real"]) == 10
    with pytest.raises(SystemExit):
        headroom_main(common + ["--num-samples", "105"])
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "unconditional")
    with pytest.raises(ValueError, match="unconditional"):
        headroom_main(["--model", str(tmp_path / "unconditional"), "--steps", "2", "--device", "cpu",
                       "--num-samples", "20"])


def test_time_shift_reads_the_noise_level_of_noised_data():
    """benchmarks/time_shift.py: x_t drawn from q(x_t | x_0) at t = 300 (images of one known pixel variance) read as
    t = 300 within a few steps from a window of +-40 around 320 under the data yardstick, and over 40 steps noisier
    under the noise-only one (content read as noise); the window stays above the chain's next timestep."""
    from time_shift import expected_variance, shifted_timestep

    scheduler = DDPMCustomScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.where(torch.rand(512, 1, 28, 28, generator=generator) < 0.5, -0.6, 0.4)  # per-image variance 0.25
    data_var = float(x0.flatten(1).var(dim=1).mean())
    x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), torch.tensor(300))
    variance = float(x_t.double().flatten(1).var(dim=1).mean())
    read = shifted_timestep(expected_variance(scheduler.alphas_cumprod, data_var), variance, 320, 200, 40)
    assert abs(read - 300) <= 5
    assert shifted_timestep(expected_variance(scheduler.alphas_cumprod, 0.0), variance, 320, 200, 40) > read + 40
    assert shifted_timestep(expected_variance(scheduler.alphas_cumprod, data_var), variance, 320, 310, 40) == 311
    assert shifted_timestep(expected_variance(scheduler.alphas_cumprod, data_var), variance, 990, 950, 40) == 951
    assert shifted_timestep(expected_variance(scheduler.alphas_cumprod, data_var), variance, 320, 200, 0) == 320


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_time_shift_asks_the_model_at_the_shifted_timestep_and_steps_from_there(prediction_type, tmp_path):
    """Inside time_shifted the UNet answers for t_s and the scheduler's DDIM step is the one from t_s to the chain's
    next timestep (Li et al. 2024), written out here from the model's output at t_s; window 0 and leaving the block
    give the plain sampler back; the script writes one scored run per window with the shifts it took."""
    from diffusers import DDIMScheduler

    from time_shift import main as shift_main, time_shifted

    pipe = tiny_pipeline(num_train_timesteps=1000)
    pipe.scheduler = DDPMCustomScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(10)  # 900, 800, ..., 0
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    variance = float(x.double().flatten(1).var(dim=1).mean())
    expected = (torch.arange(1000) - 530).abs().double() + variance  # nearest at t = 530
    with torch.no_grad():
        at_530 = pipe.unet(x, 530).sample
        at_500 = pipe.unet(x, 500).sample
        plain = scheduler.step(at_500, 500, x, eta=0.0).prev_sample
        shifts = {}
        with time_shifted(pipe, 80, expected, shifts=shifts):
            out = pipe.unet(x, 500).sample
            torch.testing.assert_close(out, at_530)
            stepped = scheduler.step(out, 500, x, eta=0.0).prev_sample
        assert shifts == {500: [30]}
        a_s, a_prev = scheduler.alphas_cumprod[530].double(), scheduler.alphas_cumprod[400].double()
        output = at_530.double()
        if prediction_type == "epsilon":
            eps = output
            x0 = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
        else:  # output = v
            x0, eps = a_s.sqrt() * x - (1 - a_s).sqrt() * output, (1 - a_s).sqrt() * x + a_s.sqrt() * output
        torch.testing.assert_close(stepped.double(), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(stepped, plain, atol=1e-3)
        at_510 = pipe.unet(x, 510).sample
        with time_shifted(pipe, 20, expected):  # 530 out of reach: the window's top, 510
            torch.testing.assert_close(pipe.unet(x, 500).sample, at_510)
        with time_shifted(pipe, 80, expected, above=500):  # the authors' cutoff: no shift at t <= 500
            torch.testing.assert_close(pipe.unet(x, 500).sample, at_500)
        torch.testing.assert_close(pipe.unet(x, 500).sample, at_500)
        torch.testing.assert_close(scheduler.step(at_500, 500, x, eta=0.0).prev_sample, plain)
        assert "_chain_coefficients" not in vars(scheduler) and "forward" not in vars(pipe.unet)

    def draw():
        return pipe(batch_size=2, num_inference_steps=4, eta=0.0, generator=torch.Generator().manual_seed(0), output_type="pt").images

    reference = draw()
    with time_shifted(pipe, 0, expected):
        torch.testing.assert_close(draw(), reference)
    other = DDPMCustomPipeline(pipe.unet, DDIMScheduler.from_config(scheduler.config))
    with pytest.raises(ValueError, match="DDIMScheduler"), time_shifted(other, 20, expected):
        pass
    pipe.save_pretrained(tmp_path / "model")
    results = shift_main(["--model", str(tmp_path / "model"), "--num-samples", "64", "--steps", "2", "--windows", "0", "40",
                          "--device", "cpu", "--out", str(tmp_path / "shift.json"), "--grid", str(tmp_path / "shift.png")])
    with Image.open(tmp_path / "shift.png") as picture:  # a row of 10 per window, the 8-pixel samples enlarged
        assert picture.width == 5 * picture.height and picture.height % 16 == 0
    saved = json.loads((tmp_path / "shift.json").read_text())
    assert [run["window"] for run in saved["runs"]] == [0, 40] and saved == json.loads(json.dumps(results))
    assert saved["setup"]["yardstick"] == "data" and 0.2 < saved["setup"]["data_variance"] < 0.7
    assert all(list(run["shift_by_t"]) == ["500", "0"] for run in saved["runs"])
    assert all(shift == {"mean": 0, "min": 0, "max": 0} for shift in saved["runs"][0]["shift_by_t"].values())
    assert all(-20 <= shift["min"] <= shift["mean"] <= shift["max"] <= 20 for shift in saved["runs"][1]["shift_by_t"].values())
    assert all(run["fid"] > 0 for run in saved["runs"])
    with pytest.raises(SystemExit):
        shift_main(["--model", str(tmp_path / "model"), "--windows", "-2"])


def test_autoguidance_extrapolates_from_the_guide_and_refuses_a_guide_of_another_task(tmp_path):
    """benchmarks/autoguidance.py: inside its block the UNet returns guide + w (model - guide), computed here from
    the two UNets called separately, for the same x_t, t and labels; weight 1 and leaving the block restore the
    model's own output; a guide with another prediction type or class count is refused by name; the script writes
    one scored run per weight."""
    from autoguidance import autoguided, check_guide_fits, main as guidance_main

    pipe = tiny_pipeline(num_train_timesteps=20, num_class_embeds=3)
    guide = tiny_pipeline(num_train_timesteps=20, seed=1, num_class_embeds=3)
    x, t, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(7), torch.tensor([0, 1, 2])
    with torch.no_grad():
        own = pipe.unet(x, t, class_labels=labels).sample
        weak = guide.unet(x, t, class_labels=labels).sample
        assert not torch.allclose(own, weak, atol=1e-3)
        with autoguided(pipe, guide.unet, 2.0):
            torch.testing.assert_close(pipe.unet(x, t, class_labels=labels).sample, weak + 2.0 * (own - weak))
        with autoguided(pipe, guide.unet, 1.0):
            torch.testing.assert_close(pipe.unet(x, t, class_labels=labels).sample, own)
        torch.testing.assert_close(pipe.unet(x, t, class_labels=labels).sample, own)

    check_guide_fits(pipe, guide)
    other_task = DDPMCustomPipeline(tiny_unet(num_class_embeds=4), DDPMCustomScheduler(num_train_timesteps=20, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="num_class_embeds.*prediction_type"):
        check_guide_fits(pipe, other_task)

    pipe.save_pretrained(tmp_path / "model")
    guide.save_pretrained(tmp_path / "guide")
    results = guidance_main(["--model", str(tmp_path / "model"), "--guide", str(tmp_path / "guide"), "--num-samples", "64",
                             "--steps", "2", "--weights", "1", "3", "--device", "cpu", "--out", str(tmp_path / "ag.json")])
    saved = json.loads((tmp_path / "ag.json").read_text())
    assert [run["weight"] for run in saved["runs"]] == [1.0, 3.0] and saved == json.loads(json.dumps(results))
    assert saved["setup"]["guide"] == str(tmp_path / "guide") and saved["runs"][0]["fid"] != saved["runs"][1]["fid"]


def test_timestep_placement_benchmark_runs_the_chains_it_names(tmp_path):
    """benchmarks/timestep_placement.py: each placement is a descending chain from the top (0.8 T for the DDIM
    paper's quadratic) to 0, denser near 0 for a power above 1; the script samples each with exactly that chain."""
    from timestep_placement import main as placement_main, placed_timesteps

    assert placed_timesteps("uniform", 50, 1000) is None
    power2 = placed_timesteps("power2", 50, 1000)
    assert power2[0] == 999 and power2[-1] == 0 and 48 <= len(power2) <= 50  # rounding repeats near 0 are dropped
    assert all(a > b for a, b in zip(power2, power2[1:]))
    assert power2[-2] - power2[-1] < 1000 / 50 < power2[0] - power2[1]  # finer than uniform at the bottom, coarser at the top
    quadratic = placed_timesteps("ddim-quadratic", 50, 1000)
    assert quadratic[0] == 800 and quadratic[-1] == 0 and all(a > b for a, b in zip(quadratic, quadratic[1:]))
    with pytest.raises(ValueError, match="Unknown placement"):
        placed_timesteps("cubic", 50, 1000)

    pipe = tiny_pipeline(num_train_timesteps=20)
    pipe.save_pretrained(tmp_path / "model")
    results = placement_main(["--model", str(tmp_path / "model"), "--num-samples", "64", "--steps", "4",
                              "--placements", "uniform", "power2", "--device", "cpu", "--out", str(tmp_path / "p.json")])
    pipe.scheduler.set_timesteps(4)
    assert [run["timesteps"] for run in results["runs"]] == [pipe.scheduler.timesteps.tolist(), placed_timesteps("power2", 4, 20)]
    assert results["runs"][0]["fid"] != results["runs"][1]["fid"]
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(results))


def test_average_weights_benchmark_saves_the_mean_and_refuses_other_architectures(tmp_path, capsys):
    """benchmarks/average_weights.py: the saved UNet is the parameter-wise mean of its sources (one of them stored
    in fp16, as the bundle is), it loads through DiffusionPipeline like any pipeline, and a source of another
    architecture is refused with the config keys that differ."""
    from average_weights import main as average_main

    from diffusers import DiffusionPipeline

    sources = [tiny_pipeline(), tiny_pipeline()]
    sources[1].unet = tiny_unet(seed=1)
    sources[1].unet.to(torch.float16)
    for i, source in enumerate(sources):
        source.save_pretrained(tmp_path / f"source{i}")
    assert average_main([str(tmp_path / "averaged"), str(tmp_path / "source0"), str(tmp_path / "source1")]) == 0
    averaged = DiffusionPipeline.from_pretrained(tmp_path / "averaged", trust_remote_code=True).unet
    first, second = (dict(s.unet.named_parameters()) for s in sources)
    for name, param in averaged.named_parameters():
        assert param.dtype == torch.float32
        torch.testing.assert_close(param, (first[name] + second[name].float()) / 2)
    assert not torch.equal(first["conv_in.weight"], second["conv_in.weight"].float())  # the sources differ

    tiny_pipeline(base_channels=32).save_pretrained(tmp_path / "wider")
    with pytest.raises(SystemExit):
        average_main([str(tmp_path / "bad"), str(tmp_path / "source0"), str(tmp_path / "wider")])
    assert "base_channels" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from Linux's /proc")
def test_benchmark_peak_memory_is_not_masked_by_the_parents_memory():
    """benchmarks/bench_unet.py measures each model's training-step memory in a child process. A child's
    getrusage peak starts at its parent's RSS (Linux keeps it across exec), so a parent holding more than the
    child ever uses made the growth read as ~0; the measurement must come out the same with a large parent."""
    from bench_unet import peak_memory_mb

    alone = peak_memory_mb("ours", "cpu", batch=32, repeats=1)
    ballast = bytearray(3 * 2**30)  # the parent now holds 3 GB more than any child needs
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page so it is resident
    beside_ballast = peak_memory_mb("ours", "cpu", batch=32, repeats=1)
    del ballast
    assert alone > 20, f"a batch-32 training step should need tens of MB, measured {alone:.1f}"
    assert 0.5 < beside_ballast / alone < 2, (alone, beside_ballast)


def test_benchmark_times_bf16_only_where_the_cpu_runs_it_fast(monkeypatch, capsys):
    """bench_unet.py's default rows: both precisions on a GPU and on a CPU with fast bf16; fp32 alone, saying so, on
    an AVX2-only CPU, where a bf16 row would take most of the run and measure a path nothing here takes."""
    import bench_unet

    monkeypatch.setattr(bench_unet, "cpu_has_fast_bf16", lambda: True)
    assert bench_unet.default_precisions("cpu") == ["fp32", "bf16"]
    monkeypatch.setattr(bench_unet, "cpu_has_fast_bf16", lambda: False)
    assert bench_unet.default_precisions("cuda") == ["fp32", "bf16"]
    assert capsys.readouterr().out == ""
    assert bench_unet.default_precisions("cpu") == ["fp32"]
    assert "no fast bf16: timing the fp32 rows only" in capsys.readouterr().out


def test_roofline_counts_the_arithmetic_and_the_benchmarked_models_do_equal_work():
    """benchmarks/roofline.py: FLOPs of a convolution match the textbook count, attention is counted whichever
    kernel runs, and the benchmark's two UNets do the same arithmetic (the table compares equal work)."""
    from bench_unet import inference_fn, make_models, training_step_fn
    from roofline import dense_kernel_share, dense_peak_gflops, flops_per_call

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    assert flops_per_call(lambda: conv(x)) == 2 * (2 * 10 * 10) * 16 * (8 * 3 * 3)
    q = torch.randn(2, 4, 49, 32)
    assert flops_per_call(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * 2 * 4 * 49 * 49 * 32)

    models = make_models("cpu", channels_last=False)
    train = {name: flops_per_call(training_step_fn(m, "cpu", 2, False)) for name, m in models.items()}
    sample = {name: flops_per_call(inference_fn(m, "cpu", 2, False, steps=1)[0]) for name, m in models.items()}
    assert train["ours"] == train["diffusers"] and sample["ours"] == sample["diffusers"], (train, sample)
    assert 2.9 < train["ours"] / sample["ours"] < 3.1  # backward costs twice the forward
    peak = dense_peak_gflops("cpu", torch.float32, repeats=1)
    assert peak["ceiling"] == max(peak["matmul"], peak["conv3x3"]) > 0

    a, x = torch.randn(512, 512), torch.randn(2_000_000)
    assert dense_kernel_share(lambda: a @ a) > 0.9
    assert dense_kernel_share(lambda: torch.sin(x).exp()) == 0
    # a mix counts both kinds; how the time splits between them depends on the machine's load, so no bound beyond that
    assert 0 < dense_kernel_share(lambda: (conv(torch.sin(torch.randn(64, 8, 10, 10))))) < 1


def test_floor_spread_measures_evaluates_floor_for_each_seed(tmp_path, capsys):
    """benchmarks/floor_spread.py: its row for a seed is the floor `evaluate --floor --seed` reports, each FID
    agrees with a Frechet distance computed independently (numpy means and covariances, scipy's sqrtm), and
    different seeds are different subsets; a repeated seed is refused."""
    from floor_spread import main as spread_main
    from scipy import linalg

    from training.evaluate import load_extractor, real_images

    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "model")
    evaluated = tmp_path / "evaluated.json"
    evaluate_main(["--model", str(tmp_path / "model"), "--num-samples", "200", "--steps", "2", "--seed", "3",
                   "--floor", "--batch-size", "200", "--device", "cpu", "--out", str(evaluated)])
    out = tmp_path / "spread.json"
    assert spread_main(["--num-samples", "200", "--seeds", "3", "4", "--device", "cpu", "--out", str(out)]) == 0
    spread = json.loads(out.read_text())
    rows = {row["evaluate_seed"]: row for row in spread["floors"]}
    assert rows[3]["fid"] == pytest.approx(json.loads(evaluated.read_text())["floor"]["fid"], rel=1e-4)

    net = load_extractor("offline", torch.device("cpu"))
    with torch.no_grad():
        reference = net(real_images("test", 10_000, 0, "cpu")).double().numpy()
        subset = net(real_images("train", 200, 4 + 1, "cpu")).double().numpy()
    mu1, mu2 = reference.mean(0), subset.mean(0)
    cov1, cov2 = np.cov(reference, rowvar=False), np.cov(subset, rowvar=False)
    with warnings.catch_warnings():  # features that are always 0 (after the net's ReLU) make both covariances singular
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * linalg.sqrtm(cov1 @ cov2).real)
    assert rows[4]["fid"] == pytest.approx(expected, rel=1e-3)
    assert rows[3]["fid"] != pytest.approx(rows[4]["fid"], rel=1e-3)
    assert spread["fid"]["min"] == min(rows[3]["fid"], rows[4]["fid"])

    with pytest.raises(SystemExit):
        spread_main(["--num-samples", "200", "--seeds", "3", "3", "--device", "cpu"])
    assert "repeats a seed" in capsys.readouterr().err


def test_real_images_count_none_is_the_whole_split_in_its_order():
    """real_images(split, None): every image of the split, in the IDX file's order, labels with them."""
    from training.data import FASHION_MNIST_IDX, read_idx

    images, labels = real_images("test", None, 3, "cpu", label_column="label")
    pixels = read_idx(os.path.join(FASHION_MNIST_IDX, "t10k-images-idx3-ubyte.gz"))
    assert images.shape == (len(pixels), 1, 28, 28)
    assert np.array_equal(np.round(images[:, 0].numpy() * 255).astype(np.uint8), pixels)
    assert labels.tolist() == read_idx(os.path.join(FASHION_MNIST_IDX, "t10k-labels-idx1-ubyte.gz")).tolist()


def test_a_draw_of_real_images_is_decoded_once_and_handed_out_as_a_copy():
    """The benchmarks draw the same reference for every row: the second draw decodes no images, gives the same
    images and labels (with or without the labels), and what a caller does to its copy does not reach the next
    caller."""
    from training import evaluate
    from training.data import FASHION_MNIST_IDX, read_idx

    evaluate.drawn_real_images.cache_clear(), evaluate.split_labels.cache_clear()

    def decoded():  # each miss of the memo decodes a draw's images
        return evaluate.drawn_real_images.cache_info().misses

    first, first_labels = real_images("test", 50, 3, "cpu", label_column="label")
    kept, kept_labels = first.clone(), first_labels.copy()
    first.add_(1), first_labels.fill(-1)
    again, again_labels = real_images("test", 50, 3, "cpu", label_column="label")
    assert decoded() == 1
    assert torch.equal(again, kept) and np.array_equal(again_labels, kept_labels)
    assert torch.equal(real_images("test", 50, 3, "cpu"), kept) and decoded() == 1  # the same draw without labels
    order = evaluate.drawn_real_images("test", 50, 3, None, None, "image", None)[1]
    assert np.array_equal(kept_labels, read_idx(os.path.join(FASHION_MNIST_IDX, "t10k-labels-idx1-ubyte.gz"))[order])
    assert not torch.equal(real_images("test", 50, 4, "cpu"), kept) and decoded() == 2  # another draw is its own


def test_offline_features_are_remembered_in_memory_for_the_same_weights_and_batch(monkeypatch):
    """Inside remembering(), a batch seen before under the same weights gets its features back without running the
    network, in any instance of the process; outside it, or once the weights change, they are computed."""
    from collections import OrderedDict

    monkeypatch.setattr(FashionFeatureNet, "_remembered", OrderedDict())
    net = FashionFeatureNet.from_pretrained(ROOT / FEATURES_DIR).eval()
    calls = []
    net.body.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        computed = net(images)
    with net.remembering():
        first, again, other = net(images), net(images), net(images[:2])
    assert calls == [3, 3, 2]  # `again` came from memory
    assert torch.equal(first, computed) and torch.equal(again, first)
    assert torch.allclose(other, first[:2], atol=1e-5)
    with torch.no_grad():
        net(images)
    assert calls == [3, 3, 2, 3]  # outside remembering(): computed
    same_weights = FashionFeatureNet.from_pretrained(ROOT / FEATURES_DIR).eval()
    same_weights.body.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    with same_weights.remembering():
        assert torch.equal(same_weights(images), first)
    assert calls == [3, 3, 2, 3]
    with torch.no_grad():
        net.body[0].bias.add_(0.5)
    with net.remembering():
        changed = net(images)
    assert calls == [3, 3, 2, 3, 3] and not torch.allclose(changed, first)


def test_class_balanced_draw_takes_the_same_number_of_each_class(tmp_path, capsys):
    """real_images(balanced_by="label"), floor_spread --balanced and evaluate --balanced-floor: every class equally
    often, checked by looking each drawn image up in the IDX files read directly (not through the datasets loader);
    other seeds draw other images; a count the classes do not divide is refused with the nearest count that works."""
    from floor_spread import main as spread_main

    from training.data import FASHION_MNIST_IDX, read_idx

    pixels = read_idx(os.path.join(FASHION_MNIST_IDX, "train-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(FASHION_MNIST_IDX, "train-labels-idx1-ubyte.gz"))
    label_of = {}
    for image, label in zip(pixels.reshape(len(pixels), -1), labels):
        label_of.setdefault(image.tobytes(), set()).add(int(label))

    def drawn_labels(images):
        keys = [np.round(image.numpy() * 255).astype(np.uint8).tobytes() for image in images]
        assert len(set(keys)) == len(keys)  # no image drawn twice
        found = [label_of[key] for key in keys]
        assert all(len(candidates) == 1 for candidates in found)
        return keys, [next(iter(candidates)) for candidates in found]

    keys5, labels5 = drawn_labels(real_images("train", 200, 5, "cpu", balanced_by="label"))
    assert np.bincount(labels5, minlength=10).tolist() == [20] * 10
    keys6, labels6 = drawn_labels(real_images("train", 200, 6, "cpu", balanced_by="label"))
    assert np.bincount(labels6, minlength=10).tolist() == [20] * 10
    assert len(set(keys5) & set(keys6)) < 20
    _, unbalanced = drawn_labels(real_images("train", 200, 5, "cpu"))
    assert np.bincount(unbalanced, minlength=10).tolist() != [20] * 10  # the plain draw is not balanced by luck

    with pytest.raises(ValueError, match="multiple of the 10 classes; use e.g. 200"):
        real_images("train", 205, 5, "cpu", balanced_by="label")
    with pytest.raises(ValueError, match="needs the label column 'class'"):
        real_images("train", 200, 5, "cpu", balanced_by="class")

    out = tmp_path / "balanced.json"
    assert spread_main(["--num-samples", "200", "--seeds", "4", "--balanced", "--device", "cpu", "--out", str(out)]) == 0
    balanced = json.loads(out.read_text())
    assert "same number of each class" in balanced["setup"]["subset"]
    assert spread_main(["--num-samples", "200", "--seeds", "4", "--device", "cpu", "--out", str(out)]) == 0
    random_fid = json.loads(out.read_text())["floors"][0]["fid"]
    assert random_fid != pytest.approx(balanced["floors"][0]["fid"], rel=1e-3)

    # evaluate --balanced-floor reports the same floor; --resume without it measures the random floor again
    tiny_pipeline(num_train_timesteps=20).save_pretrained(tmp_path / "model")
    evaluated = tmp_path / "evaluated.json"
    command = ["--model", str(tmp_path / "model"), "--num-samples", "200", "--steps", "2", "--seed", "4",
               "--batch-size", "200", "--device", "cpu", "--out", str(evaluated)]
    evaluate_main(command + ["--balanced-floor"])
    floor = json.loads(evaluated.read_text())["floor"]
    assert floor["draw"] == "class-balanced" and floor["fid"] == pytest.approx(balanced["floors"][0]["fid"], rel=1e-4)
    evaluate_main(command + ["--floor", "--resume"])
    floor = json.loads(evaluated.read_text())["floor"]
    assert floor["draw"] == "random" and floor["fid"] == pytest.approx(random_fid, rel=1e-4)
    with pytest.raises(SystemExit):
        spread_main(["--num-samples", "205", "--seeds", "4", "--balanced", "--device", "cpu"])
    assert "multiple of the 10 classes" in capsys.readouterr().err


def test_features_and_classes_are_computed_without_tf32_and_the_setting_restored():
    """Sampling may use TF32 on a GPU (main() allows it for matrix products; cuDNN allows it for convolutions by
    default), but features and class predictions must not: a FID would then depend on the card."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        recorder = Tf32Recorder()
        fid, kid = make_metrics(recorder, 4, torch.device("cpu"))
        images = torch.rand(4, 1, 28, 28)
        fid.update(images, real=True), kid.update(images, real=True)
        class_histogram(images, recorder)
        assert recorder.seen == [(False, False)] * 2  # once for FID and KID together, once for the classes
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_kid_of_the_same_images_is_the_same_whatever_ran_before():
    """KID averages over random subsets drawn from torch's global generator; evaluate draws them from a fixed seed,
    so a resumed or reordered evaluation reproduces each row's KID, and leaves the caller's generator as it was."""
    from training.evaluate import score_images

    extractor = Tf32Recorder()
    extractor.forward = lambda images: images.flatten(1)[:, :2].double()
    fid, kid = make_metrics(extractor, 4, torch.device("cpu"))  # subsets of 4 out of 12: draws matter
    generator = torch.Generator().manual_seed(0)
    fid.update(torch.rand(12, 1, 28, 28, generator=generator), real=True)
    kid.update(torch.rand(12, 1, 28, 28, generator=generator), real=True)
    images = torch.rand(12, 1, 28, 28, generator=generator)
    torch.manual_seed(1)
    first = score_images(fid, kid, images, extractor)
    after_first = torch.rand(1)
    torch.manual_seed(2)
    assert score_images(fid, kid, images, extractor) == first
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)  # the global generator untouched


def test_gpu_lease_script_measures_the_rows_it_is_given_and_keeps_earlier_ones(tmp_path):
    """benchmarks/gpu_lease.sh `curve`, run here as a lease runs it but at 20 samples: a lease is 15 minutes, too
    short to find a broken script on."""
    from training.data import FASHION_MNIST_IDX, read_idx

    from .test_training import write_idx

    test_split = tmp_path / "fmnist"  # only the test split, as `prepare` packs it; its first 200 images, as the
    test_split.mkdir()  # reference's 10,000 would take most of the test to featurise in each call
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        write_idx(test_split / name, read_idx(os.path.join(FASHION_MNIST_IDX, name))[:200])
    results = tmp_path / "results" / "curve.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "LEASE_RESULTS": str(results), "LEASE_BUNDLE": str(tmp_path / "bundle"), "LEASE_NUM_SAMPLES": "20",
           "LEASE_BATCH_SIZE": "20", "LEASE_DATA": str(test_split), "LEASE_COMPARE": ""}

    def curve(*args, out):
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_lease.sh"), "curve", *args],
                              env={**env, "OUT": str(out)}, capture_output=True, text=True, timeout=600)

    first = curve("2", "--", "0", out=tmp_path / "call1")
    assert first.returncode == 0, first.stderr[-3000:]
    measured = json.loads((tmp_path / "call1" / "curve.json").read_text())
    assert [(r["steps"], r["eta"]) for r in measured["runs"]] == [(2, 0.0)]
    assert measured["setup"]["num_samples"] == 20 and measured["setup"]["model"] == str(tmp_path / "bundle")
    assert measured["setup"]["reference"].endswith("(200 images)")  # the data it was given, not the machine's
    assert (tmp_path / "call1" / "fid_vs_steps_10k_ft15.png").stat().st_size > 0

    # the next call starts from the results copied back, as the script's header says, and measures only the new row
    results.parent.mkdir()
    results.write_text(json.dumps(measured))
    second = curve("2", "3", "--", "0", out=tmp_path / "call2")
    assert second.returncode == 0, second.stderr[-3000:]
    both = json.loads((tmp_path / "call2" / "curve.json").read_text())
    assert [(r["steps"], r["eta"]) for r in both["runs"]] == [(2, 0.0), (3, 0.0)]
    assert both["runs"][0] == measured["runs"][0]

    usage = curve("1000", out=tmp_path / "call3")
    assert usage.returncode == 2 and "usage" in usage.stderr
    missing = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_lease.sh"), "curve", "2", "--", "0"],
                             env={**env, "LEASE_DATA": str(tmp_path / "nowhere")}, capture_output=True, text=True)
    assert missing.returncode == 2 and "prepare" in missing.stderr


def test_fid_terms_split_a_fid_into_its_mean_and_covariance_parts_as_the_formula_does():
    """benchmarks/fid_by_class.py's split against scipy's matrix square root on the same features: a stand-in
    extractor whose features are two pixels, so that each side's mean and covariance are known."""
    from scipy import linalg

    from fid_by_class import fid_terms

    from training.evaluate import make_metrics

    generator = torch.Generator().manual_seed(0)
    real = torch.rand(400, 1, 4, 4, generator=generator)
    generated = torch.rand(300, 1, 4, 4, generator=generator) * 0.5 + 0.3  # narrower and shifted
    fid, _ = make_metrics(Tf32Recorder(), 2, "cpu")
    fid.update(real, real=True)
    fid.update(generated, real=False)
    terms = fid_terms(fid)

    a, b = (x.flatten(1)[:, :2].double().numpy() for x in (real, generated))
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covariance_term = float(np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))
    assert terms["mean_term"] == pytest.approx(mean_term, rel=1e-6) and mean_term > 0.001
    assert terms["covariance_term"] == pytest.approx(covariance_term, rel=1e-4, abs=1e-6) and covariance_term > 0.01
    assert terms["fid"] == pytest.approx(mean_term + covariance_term, rel=1e-4)


def test_fid_by_class_agrees_with_evaluate_over_all_classes_and_splits_by_label(tmp_path):
    """benchmarks/fid_by_class.py: its all-classes FIDs of the samples and of the class-balanced floor are the
    numbers training.evaluate gives for the same model, seeds and floor; each class's row compares only that
    class's images (its samples are images i with i mod 10 == class, as evaluate labels them)."""
    from fid_by_class import main as by_class_main

    tiny_pipeline(num_train_timesteps=20, num_class_embeds=10).save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num-samples", "40", "--device", "cpu"]
    assert by_class_main([*common, "--steps", "2", "3", "--out", str(tmp_path / "c.json"),
                          "--plot", str(tmp_path / "c.png")]) == 0
    results = json.loads((tmp_path / "c.json").read_text())
    measured = evaluate_main([*common, "--steps", "2", "3", "--eta", "0", "--batch-size", "64", "--balanced-floor",
                              "--floor", "--out", str(tmp_path / "e.json")])
    assert results["floor"]["all"]["floor"]["fid"] == pytest.approx(measured["floor"]["fid"], rel=1e-6)
    for run, reference in zip(results["runs"], measured["runs"]):
        assert run["steps"] == reference["steps"]
        assert run["all"]["samples"]["fid"] == pytest.approx(reference["fid"], rel=1e-6)
    assert results["runs"][0]["all"]["samples"]["fid"] != results["runs"][1]["all"]["samples"]["fid"]
    rows = results["runs"][0]["classes"]
    assert [row["class"] for row in rows] == list(range(10)) and rows[9]["name"] == "Ankle boot"
    assert len({row["samples"]["fid"] for row in rows}) == 10  # ten different comparisons, not one repeated
    test, labels = real_images("test", 10_000, 0, "cpu", label_column="label")
    for row in (rows[1], rows[8]):  # trousers are narrow, bags wide: the class split must keep them apart
        members = test[torch.from_numpy(labels == row["class"])] * 255
        assert row["test"]["garment_area"] == pytest.approx(float((members > 15).float().mean()), rel=1e-6)
    assert rows[1]["test"]["garment_area"] < rows[8]["test"]["garment_area"]
    assert (tmp_path / "c.png").stat().st_size > 0

    # the table read back from the file: a row a class and one for all, four columns a run; ink is the gray summed
    # over the garment's pixels per pixel, counted here on the images themselves
    from fid_by_class_table import garment_ink, runs_of, table

    lines = table(*runs_of([str(tmp_path / "c.json")]))
    assert len(lines) == 2 + 10 + 1 and lines[-1].startswith("| all |")
    cells = [cell.strip() for cell in lines[2 + 1].strip("|").split("|")]  # trousers
    assert len(cells) == 3 + 4 * 2 + 1 and cells[0] == "Trouser"
    assert cells[4] == f"{rows[1]['samples']['fid'] / results['floor']['classes'][1]['floor']['fid']:.2f}x"
    trousers = test[torch.from_numpy(labels == 1)] * 255
    ink = float((trousers * (trousers > 15)).mean())
    assert garment_ink(rows[1]["test"]) == pytest.approx(ink, rel=1e-5) and cells[-1].endswith(f" / {ink:.1f}")
    other = json.loads((tmp_path / "c.json").read_text())
    other["floor"]["all"]["floor"]["fid"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another floor"):
        runs_of([str(tmp_path / "c.json"), str(tmp_path / "other.json")])

    with pytest.raises(SystemExit):  # 45 samples are not 10 classes times a whole number
        by_class_main([*common[:3], "45", "--device", "cpu"])


def test_studies_sample_with_the_timestep_spacing_they_are_given(tmp_path):
    """--timestep-spacing of the sampler studies (here fid_by_class.py): the chain evaluate samples with the same
    option, recorded in the setup block, and a different chain from the model's own spacing."""
    from fid_by_class import main as by_class_main

    tiny_pipeline(num_train_timesteps=20, num_class_embeds=10).save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num-samples", "40", "--device", "cpu", "--steps", "3"]
    for spacing in ("leading", "trailing"):
        assert by_class_main([*common, "--timestep-spacing", spacing, "--out", str(tmp_path / f"{spacing}.json")]) == 0
    leading, trailing = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("leading", "trailing"))
    assert trailing["setup"]["scheduler"]["timestep_spacing"] == "trailing"
    measured = evaluate_main([*common, "--eta", "0", "--batch-size", "64", "--timestep-spacing", "trailing",
                              "--out", str(tmp_path / "e.json")])
    fid = trailing["runs"][0]["all"]["samples"]["fid"]
    assert fid == pytest.approx(measured["runs"][0]["fid"], rel=1e-6)
    assert fid != leading["runs"][0]["all"]["samples"]["fid"]


def test_studies_that_take_guidance_sample_as_evaluate_does_with_it(tmp_path, capsys):
    """--guidance-scale and --guidance-interval of the sampler studies that take them (here fid_by_class.py): the
    samples evaluate scores with the same options, recorded in the setup block, other than the unguided ones;
    refused as evaluate refuses them. An unguided study's setup has no guidance keys, as before the options."""
    from fid_by_class import main as by_class_main

    tiny_pipeline(num_train_timesteps=20, num_class_embeds=10).save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num-samples", "40", "--device", "cpu", "--steps", "3"]
    guided = ["--guidance-scale", "2", "--guidance-interval", "5", "15"]  # DDIM-3 on 20 timesteps: t = 12, 6, 0
    assert by_class_main([*common, *guided, "--out", str(tmp_path / "guided.json"), "--plot", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0  # its legend names the guidance
    assert by_class_main([*common, "--out", str(tmp_path / "plain.json")]) == 0
    results, plain = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("guided", "plain"))
    assert results["setup"]["guidance_scale"] == 2.0 and results["setup"]["guidance_interval"] == [5, 15]
    assert "guidance_scale" not in plain["setup"] and "guidance_interval" not in plain["setup"]
    measured = evaluate_main([*common, *guided, "--eta", "0", "--batch-size", "64", "--out", str(tmp_path / "e.json")])
    fid = results["runs"][0]["all"]["samples"]["fid"]
    assert fid == pytest.approx(measured["runs"][0]["fid"], rel=1e-6)
    assert fid != plain["runs"][0]["all"]["samples"]["fid"]
    for bad, message in [(["--guidance-interval", "5", "15"], "--guidance-scale is 1"),
                         (["--guidance-scale", "2", "--guidance-interval", "15", "5"], "0 <= LOWEST <= HIGHEST")]:
        with pytest.raises(SystemExit):
            by_class_main([*common, *bad])
        assert message in capsys.readouterr().err


def test_x0_mean_along_chain_is_zero_for_an_exact_model_and_finds_a_bias_and_a_dim_chain():
    """benchmarks/x0_mean_along_chain.py: data of one fixed image per class, and a model that knows it (its x0
    prediction is the image of the label it is given): at every step the x0 prediction's class average is the
    data's and the chain's x_t have q's mean square, under DDIM and the ancestral chain. A model one class of which
    sees its image 0.05 brighter reads +6.4 gray levels in that class only, at every step (3 classes in batches of
    64: the labels follow the images across batches); one that predicts every image at half contrast drives the
    x_t off q."""
    from sampler_study import unet_output_changed
    from x0_mean_along_chain import GRAY, ChainMoments, reference_statistics

    from training.evaluate import sample

    pipe = tiny_pipeline(num_train_timesteps=1000, num_class_embeds=3)
    images = torch.zeros(3, 1, 8, 8)
    images[0, :, 2:6, 2:6], images[1, :, 1:7, 3:5], images[2, :, 4:8, :] = 0.8, 0.6, 0.7
    regions, reference, reference_square = reference_statistics(images.repeat(2, 1, 1, 1), np.array([0, 1, 2] * 2), 3)
    assert regions["garment core"].sum(1).tolist() == [16, 12, 32] and (regions["elsewhere"] == ~regions["garment core"]).all()
    x0_of_class = images * 2 - 1
    abar = pipe.scheduler.alphas_cumprod

    def knows(shift=(0.0, 0.0, 0.0), contrast=1.0):
        def change(output, x_t, t, class_labels=None):
            a = abar[int(t)].double()
            x0 = contrast * x0_of_class[class_labels].double() + torch.tensor(shift, dtype=torch.float64)[class_labels, None, None, None]
            return ((x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()  # the epsilon that gives x0
        return change

    labels = torch.arange(200) % 3

    def chain(change, eta):
        moments = ChainMoments(regions, 3)
        with unet_output_changed(pipe, change):
            samples = sample(pipe, 200, 10, eta, 0, 64, 1.0, callback_on_step_end=moments,
                             callback_on_step_end_tensor_inputs=["pred_original_sample", "latents"])
        return samples, moments.rows(labels, reference, reference_square, abar.double())

    for eta in (0.0, 1.0):
        samples, rows = chain(knows(), eta)
        assert [r["t"] for r in rows] == [int(t) for t in pipe.scheduler.timesteps] and "x_next" not in rows[-1]
        for row in rows:
            for region in row["regions"].values():
                assert region["gap"] == pytest.approx(0, abs=0.01) and max(map(abs, region["gap_by_class"])) < 0.01
        assert [r["x_next"]["square_over_q"] for r in rows[:-1]] == pytest.approx([1.0] * (len(rows) - 1), abs=0.05)
        assert rows[-2]["x_next"]["x0_gray"] == pytest.approx(rows[-2]["x_next"]["reference_gray"], abs=0.5)
        torch.testing.assert_close(samples, images[labels], atol=2e-3, rtol=0)

    _, brighter = chain(knows(shift=(0.0, 0.05, 0.0)), 0.0)
    for row in brighter:
        assert row["regions"]["all"]["gap_by_class"] == pytest.approx([0.0, 0.05 * GRAY, 0.0], abs=0.01)
        assert abs(row["regions"]["all"]["change_since_first_step"]) < 0.01  # the same bias from the first step on
    _, dim = chain(knows(contrast=0.5), 0.0)
    assert dim[-2]["x_next"]["square_over_q"] < 0.7 and dim[-1]["regions"]["garment core"]["gap"] < -20
    # a model that dims its prediction as the noise falls: the change since the first step, paired image by image
    def contrast(t):
        return 1 - 0.4 * (1 - int(t) / 1000)

    _, fading = chain(lambda output, x_t, t, class_labels=None: knows(contrast=contrast(t))(
        output, x_t, t, class_labels), 0.0)
    changes = [row["regions"]["garment core"]["change_since_first_step"] for row in fading]
    assert changes[0] == 0 and all(b < a for a, b in zip(changes, changes[1:]))
    first, last = pipe.scheduler.timesteps[0], pipe.scheduler.timesteps[-1]
    core = regions["garment core"].view(3, 1, 8, 8)
    by_class = torch.stack([x0_of_class[k][core[k]].mean() for k in range(3)]).double() * (contrast(last) - contrast(first)) * GRAY
    expected = by_class[labels]
    assert changes[-1] == pytest.approx(float(expected.mean()), abs=0.01)
    assert fading[-1]["regions"]["garment core"]["change_standard_error"] == pytest.approx(
        float(expected.std() / len(expected) ** 0.5), abs=0.01)


def test_x0_mean_along_chain_writes_every_run_and_refuses_bad_arguments(tmp_path):
    """The script end to end on a tiny model: one run per (steps, eta), one row per step (the last hands on no x_t),
    the finished samples scored as saved, the plot drawn; the reference is Fashion-MNIST's train split, whose
    average pixel is the 0.2860 that every normalisation of the dataset quotes."""
    from x0_mean_along_chain import main as chain_main

    tiny_pipeline(num_train_timesteps=20, num_class_embeds=10).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="8x8 images, Fashion-MNIST's are"):
        chain_main(["--model", str(tmp_path / "small"), "--num-samples", "2", "--steps", "1"])
    tiny_pipeline(num_train_timesteps=20, num_class_embeds=10, sample_size=28, attention_resolutions=(14,)).save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num-samples", "20", "--device", "cpu"]
    results = chain_main(common + ["--steps", "3", "4", "--etas", "0", "1", "--out", str(tmp_path / "chain.json"),
                                   "--plot", str(tmp_path / "chain.png")])
    assert json.loads((tmp_path / "chain.json").read_text()) == results and (tmp_path / "chain.png").stat().st_size > 0
    assert [(run["steps"], run["sampler"]) for run in results["runs"]] == [
        (3, "DDIM"), (3, "DDPM ancestral"), (4, "DDIM"), (4, "DDPM ancestral")]
    for run in results["runs"]:
        assert len(run["rows"]) == run["steps"] and ["x_next" in row for row in run["rows"]] == [True] * (run["steps"] - 1) + [False]
        assert set(run["samples"]) == set(run["rows"][0]["regions"]) == {"all", "garment core", "elsewhere"}
        assert run["samples"]["all"]["reference_gray"] == pytest.approx(0.2860 * 255, abs=0.05)
        assert len(run["samples"]["all"]["gap_by_class"]) == 10
    for bad in (["--num-samples", "1"], ["--steps", "0"], ["--etas", "-1"]):
        with pytest.raises(SystemExit):
            chain_main(common + bad)
