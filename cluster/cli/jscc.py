"""`terrahash jscc train|eval`: DeepJSCC links for field queries over radio links (training/jscc*.py)."""
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
    _tracked(config, args)
    check(config, "jscc")
    dataset = load_dataset(args.data)
    epochs = sum(link_start(config, hops, model).epochs for _, hops, _, model in link_names(config))
    images = len(dataset.split("train")) * epochs
    with track_run(config, args.out, dataset, images, run_name=f"{config.name}-train", artifacts=("jscc.json",)) as run:
        manifest = train_grid(config, args.hasher, args.data, args.out)
        run.log_metrics({f"{link['name']}/final_loss": link["loss"][-1] for link in manifest["links"]})
    print(f"trained {len(manifest['links'])} links in {args.out} (jscc.json lists them)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from serving.ingest.dataset import load_dataset
    from training.jscc_config import jscc_config_from_dict
    from training.jscc_eval import evaluate_grid, format_points
    from training.tracking import track_run

    manifest = json.loads((Path(args.model) / "jscc.json").read_text())
    config = jscc_config_from_dict(manifest["config"])
    _tracked(config, args)
    dataset = load_dataset(args.data)
    run_name = f"{config.name}-eval" + ("" if args.split == "test" else f"-{args.split}")
    with track_run(config, args.model, dataset, len(dataset.split(args.split)), run_name=run_name,
                   artifacts=()) as run:
        report = evaluate_grid(args.model, args.data, split=args.split)
        run.log_metrics({"map_all_clean": report["map_all_clean"], **{
            f"{p['protocol']}/{p.get('hops', '')}{p.get('n_q', '')}{'-' + format(p['b'], 'g') if 'b' in p else ''}"
            f"/snr{p['snr_db']:g}/{p['model']}/{name}": p[name]
            for p in report["points"] for name in ("psnr", "ms_ssim", "bit_agreement", "map_all")}})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_points(report))
    return 0


def _send(args: argparse.Namespace) -> int:
    import torch

    from training.features import load_image
    from training.jscc_export import SPEC_FILE, received_message, send
    from training.jscc_train import load_hasher, load_link

    folder = Path(args.model)
    manifest = json.loads((folder / "jscc.json").read_text())
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
    Path(args.out).write_text(json.dumps(body))
    print(f"{len(symbols)} complex symbols over {args.hops} hop(s) at {args.snr:g} dB ({name}, model version "
          f"{spec['model_version']}) in {args.out}: POST it to /v1/search/received")
    return 0


def add_jscc_commands(subparsers) -> None:
    data_options = argparse.ArgumentParser(add_help=False)
    data_options.add_argument("--data", default=os.environ.get("TERRAHASH_DATA", "../shared/data/ucm_captions"),
                              help="dataset folder holding one Karpathy-style dataset*.json with train, val and test "
                                   "splits (default: %(default)s, or $TERRAHASH_DATA)")
    data_options.add_argument("--device", choices=("auto", "cpu", "cuda"), help="compute device (default: the config's)")
    jscc = subparsers.add_parser("jscc", help="DeepJSCC links for field queries sent over noisy radio links",
                                 description="Train and evaluate DeepJSCC encoder/decoder links (multi-hop decode-and-"
                                             "forward, quantize-and-forward) whose received images keep the frozen "
                                             "hasher's codes (training/jscc.py).")
    sub = jscc.add_subparsers(dest="jscc_command", required=True, metavar="COMMAND")
    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument("--no-track", action="store_true", help="do not log to MLflow nor measure energy")
    tracking.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI, overriding the config")
    train = sub.add_parser("train", parents=[data_options, tracking], help="train the baseline and aligned links of a grid",
                           description="Train every link of the config's grid, the baseline (MSE) and the aligned "
                                       "model (MSE + lambda L_SdH through the frozen hasher), on crops of the train "
                                       "split; writes OUT/<link>.pt and OUT/jscc.json and logs the run to MLflow with "
                                       "its energy.")
    train.add_argument("--config", default="cpu", help="YAML file or shipped name: cpu (128 px crops, sized for a 2-core "
                                                       "CPU) or gpu (256 px, the paper's 12 models) (default: %(default)s)")
    train.add_argument("--hasher", required=True, metavar="MODEL_DIR",
                       help="a `terrahash train` folder: its distilled image student (RUN/students; config hasher: "
                            "student) or its teacher (hasher: teacher) is the frozen hasher")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--epochs", type=int, help="epochs per link, overriding the config's epochs (a link started "
                                                  "from a trained pair keeps the config's warm_start_epochs or "
                                                  "aligned_epochs when it sets them)")
    train.set_defaults(handler=_train)
    evaluate = sub.add_parser("eval", parents=[data_options, tracking], help="the grid's table on the test (or val) split",
                              description="PSNR, MS-SSIM, bit agreement of the hasher's codes and received-query "
                                          "mAP@all (against the clean train+val database) at every grid point: hops "
                                          "1..4 x SNR for decode-and-forward, (N_Q, b) x SNR for quantize-and-forward, "
                                          "baseline and aligned. Prints the table; --json writes it (key points).")
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
                                        "SNR, the hop count, the decoder's model version and the image's own hash.")
    sender.add_argument("image", help="image file (resized to the link's image size)")
    sender.add_argument("--model", required=True, help="folder written by `terrahash jscc train`")
    sender.add_argument("--snr", type=float, required=True, help="SNR of every hop, dB")
    sender.add_argument("--hops", type=int, default=1, help="hops of the link, relays + 1 (default: %(default)s)")
    sender.add_argument("--link", choices=("aligned", "baseline"), default="aligned",
                        help="which trained model (default: %(default)s)")
    sender.add_argument("--out", required=True, help="the JSON body to write")
    sender.add_argument("--k", type=int, default=10, help="results asked for (default: %(default)s)")
    sender.add_argument("--seed", type=int, default=0, help="seed of the channel noise (default: %(default)s)")
    sender.add_argument("--no-hash", action="store_true", help="leave out the source image's hash")
    sender.set_defaults(handler=_send)
