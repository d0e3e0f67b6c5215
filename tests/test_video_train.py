"""Training with video: a text + video mix trains both and is evaluated on the video sets; a
world-model run resumes exactly from a checkpoint."""

import json
import shutil

import torch
from safetensors.torch import load_file

from moesaic.config import load_config
from moesaic.train.loop import Trainer
from moesaic.train.metrics import read_metrics
from tests.train_utils import MICRO

VIDEO = ["data.seq_len=128", "data.video.min_frames=2", "data.video.max_frames=3"]


def _rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_text_and_video_mix_trains_both(tmp_path):
    cfg = load_config("tiny", [*MICRO, *VIDEO, f"out={tmp_path}", "train.steps=30",
                               "train.warmup=5", "eval.every=0",
                               "data.mix={text: 0.5, video: 0.5}"])  # fmt: skip
    summary = Trainer(cfg).run()
    rows = _rows(tmp_path / "tiny")
    assert all(r["image_loss"] == 0 for r in rows)
    for key in ("text_loss", "video_loss"):  # 2-row batches hold both kinds nearly always
        assert sum(r[key] > 0 for r in rows) >= 0.8 * len(rows), key

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    assert mean("text_loss", rows[-5:]) < mean("text_loss", rows[:5]) - 0.5
    assert mean("video_loss", rows[-5:]) < mean("video_loss", rows[:5])
    assert {"text/text", "video/video", "action_video/video", "image/image"} <= set(summary["eval"])


def test_world_model_run_resumes_exactly(tmp_path):
    extra = [*MICRO, *VIDEO, "train.steps=12", "train.checkpoint_every=4", "eval.every=4",
             "train.keep_checkpoints=5", "data.mix={action_video: 0.8, video: 0.2}",
             "model.ffn.kind=modality", "model.ffn.video_ffn=own", "model.patch_positions=true",
             "model.prediction=x0"]  # fmt: skip
    ref = tmp_path / "ref"
    Trainer(load_config("tiny", [*extra, f"out={tmp_path}", "name=ref"])).run()
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    for step in (8, 12):
        shutil.rmtree(cut / "checkpoints" / f"step-{step:08d}")
    (cut / "summary.json").unlink()
    cfg = load_config(cut / "config.yaml", [f"out={tmp_path}", "name=cut"])
    Trainer(cfg, resume=True).run()
    last = "checkpoints/step-00000012/model.safetensors"
    a, b = load_file(str(ref / last)), load_file(str(cut / last))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = ("tokens_per_s",)
    logs = [read_metrics(d / "metrics.jsonl") for d in (ref, cut)]
    rows = [[{k: v for k, v in r.items() if k not in strip} for r in log] for log in logs]
    assert rows[0] == rows[1]
    assert (
        json.loads((ref / "summary.json").read_text())["eval"]
        == json.loads((cut / "summary.json").read_text())["eval"]
    )
