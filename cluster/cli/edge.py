"""``terrahash bundle``: one file that searches a release offline (serving/edge), read by ``terrahash-edge``."""
from __future__ import annotations

import argparse


def add_edge_commands(subparsers) -> None:
    bundle = subparsers.add_parser(
        "bundle", help="write one file that searches a release offline (terrahash-edge)",
        description="Write a release's image codes (and caption codes) with their ids, classes, footprints and "
                    "times, the text student and its tokenizer (and the image student), into one file: a zip of "
                    "stored members with a manifest of their sha256, memory-mapped by `terrahash-edge FILE --query "
                    "...`, which needs only `pip install 'terrahash[edge]'`. Its answers equal the service's for the "
                    "same release when the service serves the same student variant (serving: encoder_variant).")
    bundle.add_argument("--release", required=True, metavar="URI",
                        help="the index's artifact root (a folder or s3://bucket/prefix)")
    bundle.add_argument("--version", metavar="rNNNN", help="which release of it (default: the latest)")
    bundle.add_argument("--out", required=True, metavar="FILE", help="the bundle file to write (replaced atomically)")
    bundle.add_argument("--variant", choices=("int8", "fp32"), default="int8",
                        help="the students' variant: int8, the small one (default), or fp32")
    bundle.add_argument("--with-image-encoder", action="store_true",
                        help="add the image student, for searches by example (about 10 MB at int8)")
    bundle.add_argument("--thumbnails", type=int, metavar="PX",
                        help="add a JPEG thumbnail of each image, its longer side PX pixels (e.g. 64)")
    bundle.add_argument("--no-captions", action="store_true",
                        help="leave out the caption codes (then rerank 'fusion' is not available)")
    bundle.add_argument("--encrypt", action="store_true",
                        help="seal every member with the index key (AES-256-GCM): the bundle opens only with it")
    bundle.add_argument("--key-file", metavar="FILE",
                        help="the index key (default: $TERRAHASH_INDEX_KEY, else $TERRAHASH_INDEX_KEY_FILE): to read "
                             "an encrypted index, and for --encrypt")
    bundle.add_argument("--model", metavar="MODEL",
                        help="the model version to take the students from (default: the one the release was "
                             "built with)")
    bundle.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI, for a models:/ model")
    bundle.set_defaults(handler=_bundle)


def _bundle(args: argparse.Namespace) -> int:
    from serving.edge.build import write_bundle

    manifest = write_bundle(args.release, args.out, release=args.version, model=args.model, variant=args.variant,
                            with_image_encoder=args.with_image_encoder, captions=not args.no_captions,
                            thumbnails=args.thumbnails, encrypt=args.encrypt, key_file=args.key_file,
                            tracking_uri=args.tracking_uri)
    size = sum(m["bytes"] for m in manifest["members"].values())
    counts = ", ".join(f"{entry['rows']} {name}" for name, entry in manifest["collections"].items())
    print(f"wrote {args.out}: release {manifest['release']}, {counts}, encoders {', '.join(manifest['encoders'])} "
          f"({manifest['variant']}), {size / 1e6:.1f} MB{' encrypted' if manifest['encryption'] else ''}; search it "
          f"with `terrahash-edge {args.out} --query \"...\"`")
    return 0
