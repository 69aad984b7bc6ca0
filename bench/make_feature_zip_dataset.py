"""Generate a preliminary-layout dataset (zip of float16 <id>.npy frame features) for the scale runs.

    python -m bench make_feature_zip_dataset --out bench_cache/scale100k --n 100000 --split labeled

Prints the files written, their size, the wall time and the peak resident memory of this process,
so the run itself shows that memory stays flat as N grows.
"""
import argparse

from bench.common import measured
from demo.synthetic import generate_feature_zip_dataset

BENCHMARK = {"kind": "data", "summary": "a preliminary-layout dataset of generated frame features (zip of <id>.npy), any size"}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench make_feature_zip_dataset", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset directory (zip_feats/, annotations/ go here)")
    parser.add_argument("--n", type=int, required=True, help="number of videos")
    parser.add_argument("--frames", type=int, default=32, help="most frames per video")
    parser.add_argument("--dim", type=int, default=768, help="feature dimension")
    parser.add_argument("--split", default="test", help="split name (labeled, unlabeled, test, ...)")
    parser.add_argument("--classes", type=int, default=200, help="classes of the 200-class map to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-labels", action="store_true",
                        help="leave category_id out of the annotations (hidden labels go to answers/)")
    args = parser.parse_args(argv)
    with measured() as m:
        summary = generate_feature_zip_dataset(args.out, args.n, n_frames=args.frames, dim=args.dim,
                                               split=args.split, n_classes=args.classes, seed=args.seed,
                                               with_labels=not args.no_labels)
    seconds, peak_mib = m.wall_s, m.peak_rss_mib
    print(f"wrote {args.out}/zip_feats/{args.split}.zip and annotations/{args.split}.json")
    print(f"videos {summary['n_videos']:,}  frames {summary['n_frames']:,}  "
          f"zip {summary['zip_bytes'] / 2**30:.2f} GiB  classes {args.classes} "
          f"(largest {summary['largest_class']}, smallest {summary['smallest_class']})")
    print(f"wall {seconds:.1f} s  ({summary['n_videos'] / seconds:,.0f} videos/s)  peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
