"""`fastres embed`: image files or folders in, an N x D embedding matrix and its JSONL index out."""

from __future__ import annotations

from .args import UsageError, add_command, add_image_file_args, examples


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "embed",
        help="image files or folders in, pooled embeddings (N x D float32) out",
        description="Embed image files with the network's globally pooled features (no fc), preprocessed\n"
        "exactly as `fastres classify` does (the weights' resize and centre crop). Writes an N x D float32\n"
        "matrix (.npy, or .safetensors under the key 'embeddings') and beside it a JSONL index, one\n"
        '{"index": row, "path": file} per line in the same order (embeddings.npy -> embeddings.jsonl).\n'
        "A file that cannot be decoded is reported on stderr and gets no row; the exit status is then 1.",
        epilog=examples(
            "fastres embed photos/ --weights DEFAULT --out embeddings.npy",
            "fastres embed data/ --model resnet18 --weights IMAGENET1K_V1 --out emb.npy --normalize",
            "fastres embed data/ --weights finetune.pth --out emb.safetensors   # format from the suffix",
        ),
    )
    add_image_file_args(p)
    p.add_argument(
        "--out", required=True, metavar="FILE", help="where the matrix goes (.npy or .safetensors)"
    )
    p.add_argument(
        "--normalize", action="store_true", help="scale each row to unit L2 norm (cosine retrieval)"
    )
    p.add_argument(
        "--format",
        choices=("npy", "safetensors"),
        help="default: from --out's suffix (.safetensors), else npy",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..embedding import embed_command
    from ..images import require_pillow

    try:
        require_pillow()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    return embed_command(args)
