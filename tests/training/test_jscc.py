"""DeepJSCC models: shapes and the power constraint, the AWGN channel's measured noise power, the
frozen hasher (no update, gradients through it), and the quantize-and-forward rate and codebook."""
from __future__ import annotations

import pytest
import torch

from training.jscc import (AlignedLoss, BlockQuantizer, DecodeForward, Decoder, Encoder, awgn, bandwidth_ratio,
                           noise_variance, power_normalize, psnr, qf_bits_per_pixel, symbols)


@pytest.mark.parametrize("conditioned", [False, True])
def test_codec_shapes_and_unit_power_per_complex_symbol(conditioned):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 48)
    encoder, decoder = Encoder(c_out=8, width=16, snr_conditioning=conditioned), Decoder(8, 16, conditioned)
    with torch.no_grad():
        z = encoder(images, snr_db=-5.0)
    assert z.shape == (3, 8, 8, 12)
    k = symbols(8, 32, 48)
    assert k == 8 * 8 * 12 // 2
    assert z.flatten(1).pow(2).sum(dim=1) == pytest.approx(torch.full((3,), float(k)), rel=1e-5)
    complex_symbols = torch.view_as_complex(z.flatten(1).reshape(3, k, 2))
    assert complex_symbols.abs().pow(2).mean(dim=1) == pytest.approx(torch.ones(3), rel=1e-5)
    with torch.no_grad():
        out = decoder(z, snr_db=-5.0)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert bandwidth_ratio(32) == pytest.approx(1 / 3)
    assert symbols(32, 256, 256) == pytest.approx(256 * 256 * 3 / 3)  # rho = k / (3 H W) = 1/3
    with pytest.raises(ValueError, match="multiples of 4"):
        symbols(8, 30, 32)


def test_power_normalisation_is_per_image():
    z = torch.stack([torch.ones(4, 2, 2), 10 * torch.ones(4, 2, 2)])
    normalised = power_normalize(z)
    assert torch.allclose(normalised[0], normalised[1]) and torch.allclose(normalised[0], torch.full((4, 2, 2), 0.5 ** 0.5))


@pytest.mark.parametrize("snr_db", [-15.0, -5.0, 0.0, 10.0])
def test_awgn_has_the_noise_power_its_snr_says(snr_db):
    z = power_normalize(torch.randn(64, 16, 16, 16))
    generator = torch.Generator().manual_seed(1)
    noise = awgn(z, snr_db, generator) - z  # (64, 2048 complex symbols each)
    measured = noise.flatten(1).pow(2).sum(dim=1).mean() / (z[0].numel() / 2)  # per complex symbol
    assert float(measured) == pytest.approx(noise_variance(snr_db), rel=0.01)
    assert float(10 * torch.log10(1 / measured)) == pytest.approx(snr_db, abs=0.05)
    real, imag = noise.flatten(1).reshape(64, -1, 2).unbind(-1)
    assert float(real.var()) == pytest.approx(float(imag.var()), rel=0.02)  # circular: half the power each
    per_image = awgn(z, torch.tensor([-15.0] * 32 + [10.0] * 32), generator) - z
    low, high = per_image[:32].pow(2).mean(), per_image[32:].pow(2).mean()
    assert float(low / high) == pytest.approx(10 ** 2.5, rel=0.05)


def test_decode_and_forward_trains_every_hop_end_to_end():
    torch.manual_seed(0)
    link = DecodeForward(hops=3, c_out=4, width=8)
    images = torch.rand(2, 3, 16, 16)
    out = link(images, snr_db=0.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    torch.mean((out - images) ** 2).backward()
    for hop in range(3):
        assert link.encoders[hop].out.weight.grad.abs().sum() > 0
        assert link.decoders[hop].inp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least one hop"):
        DecodeForward(hops=0)


class TinyHasher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 16),
                                       torch.nn.Tanh())

    def forward(self, x):
        return self.net(x)


def test_the_frozen_hasher_gets_no_update_but_passes_gradients_to_the_decoder():
    torch.manual_seed(0)
    hasher = TinyHasher()
    before = {k: v.clone() for k, v in hasher.state_dict().items()}
    decoder = Decoder(4, 8)
    loss_fn = AlignedLoss(hasher, weight=0.06).train()
    assert not hasher.training and all(not p.requires_grad for p in hasher.parameters())
    optimizer = torch.optim.SGD(list(decoder.parameters()) + list(hasher.parameters()), lr=0.5)
    source = torch.rand(4, 3, 16, 16)
    received = torch.randn(4, 4, 4, 4)
    for _ in range(3):
        optimizer.zero_grad()
        out = loss_fn(source, decoder(received))
        out["loss"].backward()
        optimizer.step()
    assert all(p.grad is None for p in hasher.parameters())
    assert all(before[k].equal(v) for k, v in hasher.state_dict().items())  # weights and BN statistics
    # the semantic term alone reaches the decoder through the hasher
    decoder.zero_grad()
    AlignedLoss(hasher, weight=1.0)(source, decoder(received))["sdh"].backward()
    assert decoder.body[-2].weight.grad.abs().sum() > 0
    baseline = AlignedLoss(None)(source, decoder(received))
    assert set(baseline) == {"loss", "mse"} and baseline["loss"] == baseline["mse"]


@pytest.mark.parametrize("n_q, b", [(4, 0.75), (2, 1), (4, 1.25), (2, 1.5), (2, 2)])
def test_quantize_and_forward_rate_is_the_papers_formula(n_q, b):
    k = symbols(32, 256, 256)  # rho = 1/3
    assert qf_bits_per_pixel(k, n_q, b, 256, 256) == pytest.approx(2 * b)  # 4 bpp at b = 2
    quantizer = BlockQuantizer(n_q, b)
    y = torch.randn(2, 32, 8, 8)
    blocks = 2 * 32 * 8 * 8 // 2 // n_q
    assert quantizer.blocks(y).shape == (2 * blocks, n_q)
    assert quantizer.bits * blocks == pytest.approx(qf_bits_per_pixel(32 * 8 * 8 // 2, n_q, b, 32, 32) * 32 * 32)


def test_the_codebook_is_learned_and_decoding_loses_less_with_more_bits():
    torch.manual_seed(0)
    y = torch.randn(16, 8, 8, 8)
    errors = []
    for b in (1, 2):
        quantizer = BlockQuantizer(2, b).fit(y, seed=0)
        indices = quantizer.encode(y)
        assert indices.shape == (16, 8 * 8 * 8 // 2) and int(indices.max()) < 2 ** (2 * b)
        errors.append(float(((quantizer.decode(indices, y.shape) - y) ** 2).mean()))
        again = BlockQuantizer(2, b).fit(y, seed=0)
        assert again.codebook.equal(quantizer.codebook)  # seeded
    assert errors[1] < errors[0] < 1.0
    with pytest.raises(ValueError, match="whole number of bits"):
        BlockQuantizer(4, 0.6)


def test_psnr_of_known_error():
    source = torch.zeros(2, 3, 4, 4)
    assert psnr(source, source + 0.1) == pytest.approx(torch.full((2,), 20.0), abs=1e-4)


def test_crops_are_seeded_per_epoch():
    import numpy as np

    from training.jscc_train import crops

    images = np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3), dtype=np.uint8)
    first = crops(images, 8, seed=0, epoch=0)
    assert first.shape == (3, 3, 8, 8) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert crops(images, 8, 0, 0).equal(first) and not crops(images, 8, 0, 1).equal(first)


def test_a_warm_started_link_starts_every_hop_from_the_one_hop_pair():
    import numpy as np

    from training.jscc_config import jscc_config_from_dict
    from training.jscc_train import train_link

    config = jscc_config_from_dict({"image_size": 16, "c_out": 4, "width": 8, "epochs": 1, "batch_size": 4,
                                    "device": "cpu", "tracking": {"enabled": False}})
    images = np.random.default_rng(0).integers(0, 255, (4, 24, 24, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    one_hop, _ = train_link(config, 1, None, "baseline", images, None, cpu, seed=0, progress=False)
    # The fine-tune's lr so small that one epoch leaves the weights where they started, to see where that was.
    warm, _ = train_link(config, 3, None, "baseline", images, None, cpu, seed=1, progress=False, start_from=one_hop,
                         lr=1e-12)
    cold, _ = train_link(config, 3, None, "baseline", images, None, cpu, seed=1, progress=False)
    pair = {**one_hop.encoders[0].state_dict(), **one_hop.decoders[0].state_dict()}

    def distance(link, hop):
        mine = {**link.encoders[hop].state_dict(), **link.decoders[hop].state_dict()}
        return max(float((mine[k].float() - v.float()).abs().max()) for k, v in pair.items())

    assert all(distance(warm, hop) < 1e-6 for hop in range(3))
    assert all(distance(cold, hop) > 1e-2 for hop in range(3))

    from training.config import ConfigError

    with pytest.raises(ConfigError, match="warm_start"):
        jscc_config_from_dict({"warm_start": True, "hops": [2, 3]})
    with pytest.raises(ConfigError, match="aligned_from_baseline"):
        jscc_config_from_dict({"aligned_from_baseline": True, "models": ["aligned"]})


def test_the_grid_trains_baseline_and_aligned_links_through_the_frozen_teacher(trained, subset, tmp_path):
    from training.jscc_config import jscc_config_from_dict
    from training.jscc_train import link_names, load_hasher, load_link, train_grid

    config = jscc_config_from_dict({"image_size": 32, "c_out": 4, "width": 8, "hops": [1, 2], "epochs": 2,
                                    "warm_start": True, "warm_start_epochs": 1, "warm_start_lr": 1e-4,
                                    "aligned_from_baseline": True, "aligned_epochs": 1,
                                    "models": ["aligned", "baseline"], "batch_size": 4, "hasher": "teacher", "device": "cpu", "tracking": {"enabled": False}})
    hasher = load_hasher(trained / "run", "teacher")
    before = {k: v.clone() for k, v in hasher.state_dict().items()}
    manifest = train_grid(config, trained / "run", subset, tmp_path, progress=False)
    assert [link["name"] for link in manifest["links"]] == ["df-h1-baseline", "df-h1-aligned", "df-h2-baseline",
                                                            "df-h2-aligned"]
    assert [n for n, *_ in link_names(config)] == [link["name"] for link in manifest["links"]]
    link, record = load_link(tmp_path / "df-h2-aligned.pt")
    assert link.hops == 2 and record["model"] == "aligned" and record["snr_db"] is None
    # The baseline's 1-hop pair trains for epochs, the aligned one starts from it and fine-tunes for
    # aligned_epochs, the 2-hop links start from their model's 1-hop pair and fine-tune for warm_start_epochs
    # at warm_start_lr.
    assert [(len(link["loss"]), link["started_from"], link["lr"]) for link in manifest["links"]] == [
        (2, "random", 1e-3), (1, "baseline 1-hop link", 1e-3), (1, "1-hop link", 1e-4), (1, "1-hop link", 1e-4)]
    assert all(set(link["terms"]) == ({"loss", "mse", "sdh"} if link["model"] == "aligned" else {"loss", "mse"})
               for link in manifest["links"])
    assert all(v.equal(load_hasher(trained / "run", "teacher").state_dict()[k]) for k, v in before.items())
    fixed = jscc_config_from_dict({"snr_conditioning": False, "hops": [1], "snr_eval_db": [-5, -10]})
    assert [n for n, *_ in link_names(fixed)] == ["df-h1-snr-5-baseline", "df-h1-snr-5-aligned",
                                                  "df-h1-snr-10-baseline", "df-h1-snr-10-aligned"]


def test_ms_ssim_fits_the_window_to_the_image_size():
    from training.jscc_eval import ms_ssim_of

    torch.manual_seed(0)
    images = torch.rand(2, 3, 128, 128)
    assert ms_ssim_of(images, images) == pytest.approx(torch.ones(2), abs=1e-5)
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(0, 1)
    assert (ms_ssim_of(images, noisy) < 0.99).all()
    with pytest.raises(ValueError, match="over 32 px"):
        ms_ssim_of(images[..., :32, :32], images[..., :32, :32])


def test_the_grid_evaluates_every_df_and_qf_point(trained, subset, tmp_path):
    from training.jscc_config import jscc_config_from_dict
    from training.jscc_eval import evaluate_grid, format_points
    from training.jscc_train import train_grid

    config = jscc_config_from_dict({"image_size": 48, "c_out": 4, "width": 8, "hops": [1, 2], "epochs": 1,
                                    "batch_size": 4, "hasher": "teacher", "device": "cpu", "snr_eval_db": [-5, -15],
                                    "qf_grid": [[4, 0.75], [2, 2]], "tracking": {"enabled": False}})
    train_grid(config, trained / "run", subset, tmp_path, progress=False)
    report = evaluate_grid(tmp_path, subset, progress=False)
    df = [p for p in report["points"] if p["protocol"] == "df"]
    qf = [p for p in report["points"] if p["protocol"] == "qf"]
    assert sorted((p["hops"], p["snr_db"], p["model"]) for p in df) == sorted(
        (h, s, m) for h in (1, 2) for s in (-5.0, -15.0) for m in ("baseline", "aligned"))
    k = 4 * 12 * 12 // 2  # complex symbols of a 48 px image at c_out = 4
    assert len(qf) == 2 * 2 * 2 and {p["bits_per_pixel"] for p in qf} == {2 * k * 0.75 / 48 ** 2, 2 * k * 2 / 48 ** 2}
    for p in report["points"]:
        assert 0 <= p["bit_agreement"] <= 1 and 0 < p["map_all"] <= 1 and p["psnr"] > 0
        assert p["map_ratio"] == pytest.approx(p["map_all"] / report["map_all_clean"])
    assert evaluate_grid(tmp_path, subset, progress=False)["points"] == report["points"]  # seeded: the same table
    assert "N_Q=4 b=0.75" in format_points(report)
    val = evaluate_grid(tmp_path, subset, progress=False, split="val")  # what a config's choices are made on
    assert report["split"] == "test" and val["split"] == "val" and val["database"]["splits"] == ["train"]
    from serving.ingest.dataset import load_dataset

    dataset = load_dataset(subset)
    assert (val["database"]["queries"], val["database"]["images"]) == (len(dataset.split("val")),
                                                                       len(dataset.split("train")))
    assert len(val["points"]) == len(report["points"])
    with pytest.raises(ValueError, match="test or the val split"):
        evaluate_grid(tmp_path, subset, progress=False, split="train")


def test_jscc_commands_train_and_evaluate_the_grid_and_log_to_mlflow(trained, subset, tmp_path, mlflow_server):
    """`terrahash jscc train` then `terrahash jscc eval --json`: the JSON's points and keys are the
    issue's interface, and both phases are MLflow runs with energy."""
    import json
    from pathlib import Path

    import yaml
    from mlflow import MlflowClient

    from cluster.cli.main import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "jscc-tiny", "image_size": 48, "c_out": 4, "width": 8, "hops": [1, 3],
                                      "epochs": 1, "batch_size": 4, "hasher": "teacher", "snr_eval_db": [-5.0],
                                      "qf_grid": [[2, 1.0]]}))
    out = tmp_path / "links"
    assert main(["jscc", "train", "--config", str(config), "--hasher", str(trained / "run"), "--data", str(subset),
                 "--out", str(out), "--device", "cpu", "--tracking-uri", mlflow_server]) == 0
    assert main(["jscc", "eval", "--model", str(out), "--data", str(subset), "--json", str(tmp_path / "jscc.json"),
                 "--device", "cpu", "--tracking-uri", mlflow_server]) == 0
    report = json.loads((tmp_path / "jscc.json").read_text())
    assert 0 < report["map_all_clean"] <= 1
    keys = {"protocol", "snr_db", "model", "psnr", "ms_ssim", "bit_agreement", "map_all"}
    assert {(p["hops"], p["model"]) for p in report["points"] if p["protocol"] == "df"} == {
        (h, m) for h in (1, 3) for m in ("baseline", "aligned")}
    assert all(keys <= set(p) and ("hops" in p if p["protocol"] == "df" else {"n_q", "b"} <= set(p))
               for p in report["points"])
    client = MlflowClient(mlflow_server)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("terrahash").experiment_id], "attributes.run_name LIKE 'jscc-tiny-%'")}
    assert set(runs) == {"jscc-tiny-train", "jscc-tiny-eval"}
    assert all("energy_kwh" in r.data.metrics for r in runs.values())
    assert "df/3/snr-5/aligned/map_all" in runs["jscc-tiny-eval"].data.metrics
    assert runs["jscc-tiny-train"].data.params["alignment_weight"] == "0.06"
    image = next(subset.glob("*.json"))  # any file of the subset names its images
    entry = json.loads(image.read_text())["images"][0]
    first = str(Path(entry["filepath"]) / entry["filename"])
    body = tmp_path / "received.json"
    assert main(["jscc", "send", first, "--model", str(out), "--snr", "-5", "--hops", "3", "--out", str(body)]) == 0
    sent = json.loads(body.read_text())
    spec = json.loads((out / "onnx" / "df-h3-aligned" / "jscc.spec.json").read_text())
    assert sent["model_version"] == spec["model_version"] and sent["hops"] == 3 and len(sent["source_hash"]) == 4
    assert main(["jscc", "send", first, "--model", str(out), "--snr", "-5", "--hops", "2", "--out", str(body)]) == 2


@pytest.mark.parametrize("conditioned", [True, False])
def test_an_exported_link_decodes_sent_symbols_as_torch_does(tmp_path, conditioned):
    import base64
    import json

    import numpy as np
    import onnxruntime as ort

    from training.jscc_config import jscc_config_from_dict
    from training.jscc_export import export_link, received_message, send

    torch.manual_seed(0)
    config = jscc_config_from_dict({"image_size": 32, "c_out": 4, "width": 8, "snr_conditioning": conditioned})
    link = DecodeForward(hops=3, c_out=4, width=8, snr_conditioning=conditioned).eval()
    record = {"config": {"image_size": 32, "c_out": 4, "snr_conditioning": conditioned, "snr_train_db": [-15, -5]},
              "model": "aligned", "snr_db": None if conditioned else -5.0}
    spec = json.loads(export_link(link, record, tmp_path).read_text())
    assert spec["symbols"] == 4 * 8 * 8 // 2 and spec["hops"] == 3 and len(spec["model_version"]) == 16
    assert config.c_out == spec["c_out"]
    image = torch.rand(3, 32, 32)
    received, _ = send(link, image, -5.0, seed=3)
    assert received.dtype == np.complex64 and received.shape == (spec["symbols"],)
    again, _ = send(link, image, -5.0, seed=3)
    assert np.array_equal(received, again)  # the channel noise is seeded
    body = received_message(received, -5.0, 3, spec["model_version"], b"\x01" * 8)
    back = np.frombuffer(base64.b64decode(body["symbols"]), dtype=np.complex64)
    assert np.array_equal(back, received) and body["source_hash"] == "01" * 8
    channel = back.view(np.float32).reshape(1, 4, 8, 8)
    feeds = {"x": channel, **({"snr_db": np.array([-5.0], dtype=np.float32)} if conditioned else {})}
    session = ort.InferenceSession(str(tmp_path / spec["decoder"]["file"]), providers=["CPUExecutionProvider"])
    decoded = session.run(["out"], feeds)[0]
    with torch.no_grad():
        want = link.decoders[-1](torch.from_numpy(channel), -5.0).numpy()
    assert decoded.shape == (1, 3, 32, 32) and np.abs(decoded - want).max() < 1e-4
