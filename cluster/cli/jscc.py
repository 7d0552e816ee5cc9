"""`terrahash jscc train|eval|send`: field queries over radio links, pixel (training/jscc*.py) and code links
(training/code_link.py, serving/model/code_link.py)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _tracked(config, args) -> None:
    if args.no_track:
        config.tracking.enabled = False
    if args.tracking_uri is not None:
        config.tracking.tracking_uri = args.tracking_uri


def _train(args: argparse.Namespace) -> int:
    from training.config import check
    from serving.ingest.dataset import load_dataset
    from training.jscc_config import load_jscc_config
    from training.jscc_train import link_names, link_start, train_grid
    from training.tracking import track_run

    config = load_jscc_config(args.config)
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.device is not None:
        config.device = args.device
    if args.protocols:
        config.protocols = tuple(args.protocols)
    _tracked(config, args)
    check(config, "jscc")
    dataset = load_dataset(args.data)
    pixel = "pixel" in config.protocols
    epochs = sum(link_start(config, hops, model).epochs for _, hops, _, model in link_names(config)) if pixel else 0
    images = len(dataset.split("train")) * epochs
    with track_run(config, args.out, dataset, images, run_name=f"{config.name}-train", artifacts=("jscc.json",)) as run:
        manifest = train_grid(config, args.hasher, args.data, args.out)
        run.log_metrics({f"{link['name']}/final_loss": link["loss"][-1] for link in manifest["links"]})
        codecs = manifest.get("code", {}).get("codecs", [])
        run.log_metrics({f"code-n{codec['uses']}/best_val_score": codec["best_val_score"] for codec in codecs})
    print(f"trained {len(manifest['links'])} pixel links and {len(codecs)} code links in {args.out} (jscc.json "
          f"lists them)")
    return 0


def _metric_names(report: dict) -> dict[str, float]:
    """MLflow metrics of a ``jscc eval`` report: one per figure and point."""
    metrics = {}
    for p in report["points"]:
        if p["protocol"] == "code":
            if p["carried"]:
                link = f"code-{p['modulation'] or p['scheme']}/h{p['hops']}/n{p['channel_uses']}/snr{p['snr_db']:g}"
                metrics.update({f"{link}/{name}": p[name] for name in ("bit_agreement", "map_all", "map_ratio")})
            continue
        link = (f"{p['protocol']}/{p.get('hops', '')}{p.get('n_q', '')}{'-' + format(p['b'], 'g') if 'b' in p else ''}"
                f"/snr{p['snr_db']:g}/{p['model']}")
        metrics.update({f"{link}/{name}": p[name] for name in ("psnr", "ms_ssim", "bit_agreement", "map_all")})
    return metrics


def _eval(args: argparse.Namespace) -> int:
    from evaluation.code_link_eval import HOPS, USES, evaluate_code_link
    from evaluation.code_link_eval import format_points as format_code_points
    from serving.ingest.dataset import load_dataset
    from training.jscc_config import jscc_config_from_dict
    from training.jscc_eval import evaluate_grid, format_points
    from training.tracking import track_run

    folder = Path(args.model)
    manifest = json.loads((folder / "jscc.json").read_text())
    config = jscc_config_from_dict(manifest["config"])
    _tracked(config, args)
    dataset = load_dataset(args.data)
    run_name = f"{config.name}-eval" + ("" if args.split == "test" else f"-{args.split}")
    with track_run(config, args.model, dataset, len(dataset.split(args.split)), run_name=run_name,
                   artifacts=()) as run:
        report = evaluate_grid(folder, args.data, split=args.split) if manifest["links"] else \
            {"split": args.split, "points": []}
        for point in report["points"]:  # pixel links: every hop carries the image's k complex symbols
            point["channel_uses"] = report["symbols"]
        if manifest.get("code"):
            code = evaluate_code_link(manifest["code"]["students"], args.data, variant=manifest["code"]["student"],
                                      hops=sorted({*HOPS, *config.hops}),
                                      snrs_db=config.snr_eval_db, uses=sorted({*USES, *config.code_link.uses}),
                                      learned=folder / manifest["code"]["folder"], split=args.split)
            report["points"] += code.pop("points")
            report["code"] = code
        clean = {"map_all_clean": report.get("map_all_clean"), "code/map_all_clean": report.get("code", {}).get(
            "map_all_clean")}
        run.log_metrics({**{k: v for k, v in clean.items() if v is not None}, **_metric_names(report)})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    if manifest["links"]:
        print(format_points({**report, "points": [p for p in report["points"] if p["protocol"] != "code"]}))
    if "code" in report:
        print(format_code_points({**report["code"], "points": [p for p in report["points"] if p["protocol"] == "code"]}))
    return 0


def _send(args: argparse.Namespace) -> int:
    folder = Path(args.model)
    manifest = json.loads((folder / "jscc.json").read_text())
    body = _send_code(args, folder, manifest) if args.link == "code" else _send_pixels(args, folder, manifest)
    Path(args.out).write_text(json.dumps(body))
    return 0


def _send_code(args: argparse.Namespace, folder: Path, manifest: dict) -> dict:
    """The field unit with onnxruntime and numpy only: its image student's code over the code link."""
    import numpy as np

    from serving.model import code_link
    from serving.model.field import code_message, encode_images, student_code_space, student_spec
    from serving.model.learned_link import load_codecs

    if not manifest.get("code"):
        raise ValueError(f"{folder}: no code links trained (the config's protocols: "
                         f"{manifest['config'].get('protocols')})")
    spec = student_spec(manifest["code"]["students"], manifest["code"]["student"])  # the codes the codecs learnt
    code = encode_images(spec, [args.image])  # (1, bits)
    rng = np.random.default_rng(args.seed)
    version = modulation = None
    if args.scheme == "learned":
        codecs = {codec.uses: codec for codec in load_codecs(folder / manifest["code"]["folder"])}
        if args.uses not in codecs:
            raise ValueError(f"{folder}: no learned codec for {args.uses} channel uses; trained: {sorted(codecs)}")
        codec, version = codecs[args.uses], codecs[args.uses].spec["model_version"]
        symbols = codec.received_symbols(code, args.hops, args.snr, rng)[0]
    else:
        modulation = args.modulation
        link = code_link.Repetition(modulation, code.shape[1], args.uses)
        symbols = code_link.received_symbols(code, args.hops, args.snr, link, rng)[0]
    source_hash = None if args.no_hash else np.packbits(code[0] >= 0).tobytes()
    body = code_message(symbols, scheme=args.scheme, snr_db=args.snr, hops=args.hops,
                        code_space=student_code_space(spec), modulation=modulation, model_version=version,
                        source_hash=source_hash, k=args.k)
    what = "learned codec" + f" {version}" if version else f"repetition, {modulation}"
    print(f"{len(symbols)} complex symbols over {args.hops} hop(s) at {args.snr:g} dB ({what}, code of "
          f"{code.shape[1]} bits) in {args.out}: POST it to /v1/search/received")
    return body


def _send_pixels(args: argparse.Namespace, folder: Path, manifest: dict) -> dict:
    import torch

    from training.features import load_image
    from training.jscc_export import SPEC_FILE, received_message, send
    from training.jscc_train import load_hasher, load_link

    wanted = [link for link in manifest["links"] if link["hops"] == args.hops and link["model"] == args.link
              and link["snr_db"] in (None, args.snr)]
    if not wanted:
        have = sorted({(link["hops"], link["model"]) for link in manifest["links"]})
        raise ValueError(f"{folder}: no {args.link} link of {args.hops} hop(s) trained for {args.snr:g} dB; it has "
                         f"(hops, model) {have}")
    name = wanted[0]["name"]
    link, _ = load_link(folder / f"{name}.pt")
    spec = json.loads((folder / "onnx" / name / SPEC_FILE).read_text())
    size = spec["image_size"]
    image = torch.from_numpy(load_image(Path(args.image), size)).permute(2, 0, 1).float().div_(255.0)
    symbols, _ = send(link, image, args.snr, seed=args.seed)
    source_hash = None
    if not args.no_hash:  # the sender's own hash of its image: cheap to send, lets the service measure the link
        import numpy as np

        hasher = load_hasher(manifest["hasher"]["model_dir"], manifest["hasher"]["kind"])
        with torch.no_grad():
            code = hasher(image[None])[0].numpy()
        source_hash = np.packbits(code >= 0).tobytes()
    body = received_message(symbols, args.snr, args.hops, spec["model_version"], source_hash, k=args.k)
    print(f"{len(symbols)} complex symbols over {args.hops} hop(s) at {args.snr:g} dB ({name}, model version "
          f"{spec['model_version']}) in {args.out}: POST it to /v1/search/received")
    return body


def add_jscc_commands(subparsers) -> None:
    data_options = argparse.ArgumentParser(add_help=False)
    data_options.add_argument("--data", default=os.environ.get("TERRAHASH_DATA", "../shared/data/ucm_captions"),
                              help="dataset folder holding one Karpathy-style dataset*.json with train, val and test "
                                   "splits (default: %(default)s, or $TERRAHASH_DATA)")
    data_options.add_argument("--device", choices=("auto", "cpu", "cuda"), help="compute device (default: the config's)")
    jscc = subparsers.add_parser("jscc", help="links for field queries sent over noisy radio links",
                                 description="Train and evaluate the links of field queries over noisy multi-hop "
                                             "radio links: DeepJSCC encoder/decoder links (decode-and-forward, "
                                             "quantize-and-forward) whose received images keep the frozen hasher's "
                                             "codes (training/jscc.py), and code links that send the image "
                                             "student's hash code instead (learned: training/code_link.py; "
                                             "repetition-coded BPSK/QPSK: serving/model/code_link.py).")
    sub = jscc.add_subparsers(dest="jscc_command", required=True, metavar="COMMAND")
    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument("--no-track", action="store_true", help="do not log to MLflow nor measure energy")
    tracking.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI, overriding the config")
    train = sub.add_parser("train", parents=[data_options, tracking], help="train the baseline and aligned links of a grid",
                           description="Train every link of the config's grid: the pixel links, baseline (MSE) and "
                                       "aligned (MSE + lambda L_SdH through the frozen hasher), on crops of the train "
                                       "split (OUT/<link>.pt, OUT/onnx/<link>/), and the learned code links, one "
                                       "codec per number of channel uses, on the image student's codes of the train "
                                       "split (OUT/code/n<uses>/), as the config's protocols ask; writes "
                                       "OUT/jscc.json and logs the run to MLflow with its energy.")
    train.add_argument("--config", default="cpu", help="YAML file or shipped name: cpu (128 px crops, sized for a 2-core "
                                                       "CPU) or gpu (256 px, the paper's 12 models) (default: %(default)s)")
    train.add_argument("--hasher", required=True, metavar="MODEL_DIR",
                       help="a `terrahash train` folder: its distilled image student (RUN/students; config hasher: "
                            "student) or its teacher (hasher: teacher) is the frozen hasher")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--protocols", nargs="+", choices=("pixel", "code"),
                       help="train only these links, overriding the config's protocols: pixel (DeepJSCC of the "
                            "image) and code (the image student's hash code, training/code_link.py)")
    train.add_argument("--epochs", type=int, help="epochs per link, overriding the config's epochs (a link started "
                                                  "from a trained pair keeps the config's warm_start_epochs or "
                                                  "aligned_epochs when it sets them)")
    train.set_defaults(handler=_train)
    evaluate = sub.add_parser("eval", parents=[data_options, tracking], help="the grid's table on the test (or val) split",
                              description="Pixel links: PSNR, MS-SSIM, bit agreement of the hasher's codes and "
                                          "received-query mAP@all (against the clean train+val database) at every "
                                          "grid point: hops 1..4 x SNR for decode-and-forward, (N_Q, b) x SNR for "
                                          "quantize-and-forward, baseline and aligned. Code links (protocol code): "
                                          "hops 1..4 x SNR x 32..4096 channel uses, repetition (BPSK, QPSK) and the "
                                          "learned codecs, received-query mAP@all, its ratio to clean queries and "
                                          "bit agreement. Prints the tables; --json writes them (key points).")
    evaluate.add_argument("--model", required=True, help="folder written by `terrahash jscc train`")
    evaluate.add_argument("--json", help="write the figures here")
    evaluate.add_argument("--split", choices=("test", "val"), default="test",
                          help="queries: the test split against train+val, or the val split against train, on which "
                               "a config's choices are made (default: %(default)s)")
    evaluate.set_defaults(handler=_eval)
    sender = sub.add_parser("send", help="simulate a field unit and its relays: the symbols the service receives",
                            description="Send IMAGE over a simulated decode-and-forward link (AWGN at --snr on every "
                                        "hop, the relays decoding and re-encoding) and write the JSON body of POST "
                                        "/v1/search/received: the complex64 symbols of the last hop (base64), the "
                                        "SNR, the hop count, the link (a pixel decoder's model version, or a code "
                                        "link's spec: scheme, channel uses, code space) and the image's own hash. "
                                        "--link code runs only onnxruntime and numpy, as a field unit would.")
    sender.add_argument("image", help="image file (resized to the link's, or the image student's, input size)")
    sender.add_argument("--model", required=True, help="folder written by `terrahash jscc train`")
    sender.add_argument("--snr", type=float, required=True, help="SNR of every hop, dB")
    sender.add_argument("--hops", type=int, default=1, help="hops of the link, relays + 1 (default: %(default)s)")
    sender.add_argument("--link", choices=("aligned", "baseline", "code"), default="aligned",
                        help="the pixel link's trained model (aligned, baseline), or code: send the image "
                             "student's hash code instead (onnxruntime and numpy only) (default: %(default)s)")
    sender.add_argument("--scheme", choices=("learned", "repetition"), default="learned",
                        help="--link code: the trained codec, or repetition-coded --modulation (default: %(default)s)")
    sender.add_argument("--modulation", choices=("bpsk", "qpsk"), default="bpsk",
                        help="--link code --scheme repetition: the modulation (default: %(default)s)")
    sender.add_argument("--uses", type=int, default=64,
                        help="--link code: complex channel uses per hop (default: %(default)s)")
    sender.add_argument("--out", required=True, help="the JSON body to write")
    sender.add_argument("--k", type=int, default=10, help="results asked for (default: %(default)s)")
    sender.add_argument("--seed", type=int, default=0, help="seed of the channel noise (default: %(default)s)")
    sender.add_argument("--no-hash", action="store_true", help="leave out the source image's hash")
    sender.set_defaults(handler=_send)
