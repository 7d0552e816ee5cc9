"""The learned code link: power, channel, a short train on synthetic codes, ONNX parity, bad inputs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from serving.model import code_link as numpy_link
from training.code_link import (CodeLink, CodeLinkConfig, CodeLinkLoss, build_link, code_link_config_from_dict,
                                export_codec, load_code_link_config, train_codec)
from training.config import ConfigError
from training.jscc import awgn

BITS = 16


def synthetic_codes(n: int, classes: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pre-sign codes with one random sign pattern per class and random magnitudes (the same classes for
    every seed), so the decoded signs of a working link are the sent ones."""
    centres = np.random.default_rng(1234).choice([-1.0, 1.0], (classes, BITS))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    codes = centres[labels] * rng.uniform(0.05, 1.0, (n, BITS))
    return codes.astype(np.float32), labels


def tiny_config(**changes) -> CodeLinkConfig:
    config = CodeLinkConfig(uses=(8, 16), hidden=64, steps=300, eval_every=50, batch_size=64, lr=1e-2,
                            snr_eval_db=(5.0,), snr_train_db=(0.0, 10.0), hops_train=(1, 2))
    return dataclasses.replace(config, **changes)


def test_shipped_config_loads():
    config = load_code_link_config("cpu")
    assert config.uses == (64, 256, 1024) and config.relay == "soft"


def test_config_rejects_unknown_keys_and_bad_ranges():
    with pytest.raises(ConfigError, match="unknown"):
        code_link_config_from_dict({"usess": [64]})
    with pytest.raises(ConfigError, match="low, high"):
        code_link_config_from_dict({"snr_train_db": [0.0, -15.0]})
    with pytest.raises(ConfigError):
        code_link_config_from_dict({"relay": "amplify"})


def test_encoder_output_has_unit_power_per_complex_symbol():
    link = CodeLink(BITS, uses=12, hidden=16)
    x = link.encoder(torch.randn(5, BITS).tanh(), torch.tensor([-15.0, -5.0, 0.0, 3.0, 10.0]))  # (5, 24)
    assert x.shape == (5, 24)
    power = (x ** 2).sum(dim=1) / 12  # per code, mean |x_j|^2 over its 12 complex symbols
    assert torch.allclose(power, torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("snr_db", [-15.0, -5.0, 3.0])
def test_torch_channel_noise_power_matches_the_numpy_channel(snr_db):
    n = 200_000
    zeros = torch.zeros(1, 2 * n)
    torch_noise = awgn(zeros, snr_db, torch.Generator().manual_seed(0)).numpy()[0]  # (2n,): I, Q pairs
    numpy_noise = numpy_link.awgn(np.zeros(n, dtype=np.complex128), snr_db, np.random.default_rng(0))  # (n,)
    sigma2 = numpy_link.noise_variance(snr_db)
    torch_power = float((torch_noise ** 2).reshape(n, 2).sum(axis=1).mean())
    numpy_power = float((np.abs(numpy_noise) ** 2).mean())
    assert torch_power == pytest.approx(sigma2, rel=0.01)
    assert numpy_power == pytest.approx(sigma2, rel=0.01)
    # the same split: sigma^2 / 2 on each real dimension
    assert float(torch_noise[0::2].var()) == pytest.approx(float(numpy_noise.real.var()), rel=0.02)


def test_a_short_train_lowers_the_loss_and_keeps_the_signs_at_high_snr():
    train, val = synthetic_codes(512, seed=0), synthetic_codes(64, seed=1)
    config = tiny_config()
    codes, labels = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    db = torch.where(codes >= 0, 1.0, -1.0)
    loss_fn = CodeLinkLoss()

    def loss_of(link):
        with torch.no_grad():
            logits = link.eval()(codes, 2, 10.0, torch.Generator().manual_seed(1))
            return float(loss_fn(logits, codes, labels, db, labels)["loss"])

    torch.manual_seed(config.seed)
    before = loss_of(build_link(config, BITS, 16, float(codes.std())))
    link, history = train_codec(config, 16, train, val)
    assert loss_of(link) < 0.5 * before
    assert history["loss"][-1] < history["loss"][0]
    with torch.no_grad():
        got = link(torch.from_numpy(val[0]), 2, 10.0, torch.Generator().manual_seed(2))
    assert torch.equal(torch.where(got >= 0, 1, -1), torch.where(torch.from_numpy(val[0]) >= 0, 1, -1))


def test_exported_codec_matches_torch_and_runs_with_numpy(tmp_path):
    from serving.model.learned_link import LearnedLink

    torch.manual_seed(0)
    link = CodeLink(BITS, uses=8, hidden=16, code_scale=0.5).eval()
    export_codec(link, tiny_config(), tmp_path)
    served = LearnedLink(tmp_path)
    rng = np.random.default_rng(0)
    codes = rng.standard_normal((6, BITS)).astype(np.float32)
    u = served.field_input(codes)
    with torch.no_grad():
        want_u = link.field_input(torch.from_numpy(codes))
        want_x = link.encoder(want_u, -7.0).numpy()
        received = rng.standard_normal((6, 16)).astype(np.float32)
        want_soft = torch.tanh(link.decoder(torch.from_numpy(received), -7.0) / 2).numpy()
    np.testing.assert_allclose(u, want_u.numpy(), atol=1e-6)
    symbols = served.encode(u, -7.0)  # (6, 8) complex
    np.testing.assert_allclose(np.stack([symbols.real, symbols.imag], -1).reshape(6, 16), want_x, atol=1e-5)
    np.testing.assert_allclose(served.decode(received[:, 0::2] + 1j * received[:, 1::2], -7.0), want_soft, atol=1e-5)
    out = served.send_over_hops(codes, 3, -5.0, np.random.default_rng(1))
    assert out.signs.shape == (6, BITS) and set(np.unique(out.signs)) <= {-1, 1}


def test_uses_outside_the_config_and_nan_inputs_raise(tmp_path):
    config = tiny_config()
    with pytest.raises(ValueError, match="no codec for 32 channel uses"):
        build_link(config, BITS, 32)
    link = build_link(config, BITS, 8)
    bad = torch.zeros(2, BITS)
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        link(bad, 1, -5.0)
    with pytest.raises(ValueError, match="NaN"):
        link(torch.zeros(2, BITS), 1, float("nan"))
    from serving.model.learned_link import LearnedLink

    export_codec(link.eval(), config, tmp_path)
    served = LearnedLink(tmp_path)
    codes = np.zeros((2, BITS), dtype=np.float32)
    codes[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        served.send_over_hops(codes, 1, -5.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="finite"):
        served.send_over_hops(np.zeros((2, BITS)), 1, float("nan"), np.random.default_rng(0))
    with pytest.raises(ValueError, match="per code"):
        served.decode(np.zeros((2, 9), dtype=np.complex128), -5.0)


def test_jscc_commands_train_evaluate_and_send_code_links(model_dir, subset, tmp_path):
    """`terrahash jscc train` with protocol code, `jscc eval --json` (entries with protocol, scheme and
    channel_uses) and `jscc send --link code`, the field unit's side in a process that never imports torch."""
    import json
    import subprocess
    import sys

    import yaml

    from cluster.cli.main import main

    config = tmp_path / "code.yaml"
    config.write_text(yaml.safe_dump({"name": "jscc-code-tiny", "protocols": ["code"], "hops": [1, 3],
                                      "snr_eval_db": [-5.0], "code_link": {"uses": [8, 32], "hidden": 16,
                                                                           "steps": 12, "eval_every": 6,
                                                                           "batch_size": 8}}))
    out = tmp_path / "links"
    assert main(["jscc", "train", "--config", str(config), "--hasher", str(model_dir), "--data", str(subset),
                 "--out", str(out), "--no-track"]) == 0
    manifest = json.loads((out / "jscc.json").read_text())
    assert manifest["links"] == [] and [c["uses"] for c in manifest["code"]["codecs"]] == [8, 32]
    assert (out / "code" / "n8" / "code_link.spec.json").is_file()
    from training.jscc_config import jscc_config_from_dict
    from training.jscc_train import train_grid

    pixel = jscc_config_from_dict({"protocols": ["pixel"], "models": ["baseline"], "hops": [1], "image_size": 32,
                                   "c_out": 4, "width": 8, "epochs": 1, "batch_size": 4, "device": "cpu"})
    both = train_grid(pixel, model_dir, subset, out, progress=False)  # the code links trained before are kept
    assert [link["name"] for link in both["links"]] == ["df-h1-baseline"] and both["code"] == manifest["code"]
    (out / "jscc.json").write_text(json.dumps(manifest))  # back to the code links alone, for eval below
    report_file = tmp_path / "eval.json"
    assert main(["jscc", "eval", "--model", str(out), "--data", str(subset), "--json", str(report_file),
                 "--no-track"]) == 0
    report = json.loads(report_file.read_text())
    points = report["points"]
    assert {p["protocol"] for p in points} == {"code"} and 0 < report["code"]["map_all_clean"] <= 1
    learned = {(p["hops"], p["channel_uses"]) for p in points if p["scheme"] == "learned"}
    assert learned == {(h, n) for h in (1, 2, 3, 4) for n in (8, 32)}
    carried = [p for p in points if p["scheme"] == "repetition" and p["carried"]]
    assert {p["modulation"] for p in carried} == {"bpsk", "qpsk"} and {p["channel_uses"] for p in carried} >= {32, 4096}
    assert all(0 <= p["bit_agreement"] <= 1 and 0 <= p["map_all"] <= 1 for p in carried)

    from serving.ingest.dataset import load_dataset

    image = str(load_dataset(subset).split("test")[0].path)
    body = tmp_path / "received.json"
    code = ("import sys; from cluster.cli.main import main; code = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'the field unit imported torch'; raise SystemExit(code)")
    sent = subprocess.run([sys.executable, "-c", code, "jscc", "send", image, "--model", str(out), "--link", "code",
                           "--uses", "8", "--snr", "-5", "--hops", "3", "--out", str(body)],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    message = json.loads(body.read_text())
    spec = json.loads((out / "code" / "n8" / "code_link.spec.json").read_text())
    assert message["link"] == {"protocol": "code", "scheme": "learned", "modulation": None, "channel_uses": 8,
                               "code_space": spec["code_space"], "model_version": spec["model_version"]}
    assert message["hops"] == 3 and len(message["symbols"]) == 4 * -(-8 * 8 // 3)  # base64 of 8 complex64
    assert main(["jscc", "send", image, "--model", str(out), "--link", "code", "--scheme", "repetition",
                 "--modulation", "qpsk", "--uses", "32", "--snr", "-5", "--hops", "2", "--out", str(body)]) == 0
    message = json.loads(body.read_text())
    assert message["link"]["scheme"] == "repetition" and message["link"]["modulation"] == "qpsk"
    assert main(["jscc", "send", image, "--model", str(out), "--link", "code", "--uses", "64", "--snr", "-5",
                 "--out", str(body)]) == 2  # no learned codec for 64 uses
