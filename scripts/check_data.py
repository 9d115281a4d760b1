"""Check a COCO-format dataset before training: every rule CocoDataset applies, decode pass included.

    python scripts/check_data.py data/coco/annotations/instances_train2017.json data/coco/train2017 \
        --stuff-dir data/coco/stuffthingmaps/train2017 --workers 8

Prints one row per finding (file, problem, action: "used after fix" / "skipped" / "error") and a
summary with counts per problem kind, plus what is worth knowing without being a problem (crowd
annotations, grayscale images, ...). The rules are the ones of scnet/data/checks.py and the decode
pass calls CocoDataset's own ``load_record``, so the report says exactly what training would do.
Exit status 1 when training could not start (malformed JSON, no categories, stuff maps missing, no
usable image, ...), 0 otherwise.
"""
import argparse
import functools
import multiprocessing
import sys
from collections import Counter

from tqdm import tqdm

from scnet.data import checks
from scnet.data.checks import ERROR, FIXED, SKIPPED, DataError, LoadError, Problem
from scnet.data.coco import load_record

# notes of checks.decode_image that are reported, with what they mean
NOTES = {
    "grayscale image": ("grayscale images", "converted to RGB"),
    "non-RGB image": ("palette/RGBA/CMYK images", "converted to RGB"),
    "16-bit image": ("16-bit images", "scaled to 8 bits"),
    "EXIF orientation": ("EXIF-rotated images", "rotated as their EXIF orientation tag says"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("annotations", help="COCO instances JSON")
    parser.add_argument("image_dir", help="folder of the images' file_name")
    parser.add_argument("--stuff-dir", help="COCO-stuff maps <image stem>.png (semantic_source=stuff_maps)")
    parser.add_argument("--semantic-source", choices=checks.SEMANTIC_SOURCES,
                        help="default: stuff_maps with --stuff-dir, none otherwise")
    parser.add_argument("--num-semantic-classes", type=int, default=183)
    parser.add_argument("--min-size", type=int, default=32, help="shorter image side below which images are dropped")
    parser.add_argument("--eval", action="store_true",
                        help="check as an evaluation set (images without annotations kept)")
    parser.add_argument("--workers", type=int, default=0, help="processes for the decode pass (0: this one)")
    parser.add_argument("--max-rows", type=int, default=0, help="print at most this many table rows (0: all)")
    args = parser.parse_args(argv)
    args.semantic_source = args.semantic_source or ("stuff_maps" if args.stuff_dir else "none")
    return args


def check_one(record, options):
    """Decode one image as CocoDataset would: ([(kind, detail, action)], [note kinds])."""
    try:
        _, fixes, notes = load_record(record, **options)
    except LoadError as e:
        return [(e.kind, e.detail, SKIPPED)], []
    return [(kind, detail, FIXED) for kind, detail in fixes], [kind for kind, _ in notes]


def decode_pass(records, options, workers):
    """(problems, note counts, names of the unusable images) of the indexed images; tqdm on stderr."""
    work = functools.partial(check_one, options=options)
    if workers > 0:
        with multiprocessing.Pool(workers) as pool:
            return _collect(records, pool.imap(work, records, chunksize=16))
    return _collect(records, map(work, records))


def _collect(records, results):
    """Gather the per-image results of ``check_one`` in record order, with a progress bar."""
    problems, notes, unusable = [], Counter(), set()
    for record, (found, note_kinds) in tqdm(zip(records, results), total=len(records), desc="decoding", unit="img"):
        problems += [Problem(record["file_name"], *f) for f in found]
        if any(action == SKIPPED for _, _, action in found):
            unusable.add(record["file_name"])
        notes.update(note_kinds)
    return problems, notes, unusable


def run_checks(args):
    """(problems, notes, stats) of the whole dataset; DataError when the JSON itself is unusable."""
    data = checks.load_annotation_file(args.annotations)
    category_ids, _ = checks.category_mapping(data["categories"])
    problems, source = [], args.semantic_source
    try:
        checks.check_semantic_options(source, args.stuff_dir, args.num_semantic_classes, len(category_ids))
    except DataError as e:  # report it, and go on checking everything else
        problems.append(Problem(args.stuff_dir or args.annotations, "semantic targets", str(e), ERROR))
        source = "none"
    index = checks.index_coco(data, args.image_dir, args.stuff_dir, source, args.min_size, training=not args.eval)
    options = dict(image_dir=args.image_dir, stuff_dir=args.stuff_dir, semantic_source=source,
                   num_semantic_classes=args.num_semantic_classes, num_classes=len(category_ids))
    load_problems, notes, unusable = decode_pass(index.records, options, args.workers)
    kept = [r for r in index.records if r["file_name"] not in unusable]
    stats = dict(index.stats, kept=len(kept), categories=len(category_ids))
    stats["usable annotations"] = sum(len(r["instances"]) for r in kept)
    if stats["kept"] == 0:
        problems.append(Problem(args.annotations, "no usable image", "every image is skipped", ERROR))
    return problems + index.problems + load_problems, notes, stats


def print_table(problems, max_rows):
    """One row per finding, grouped by file."""
    if not problems:
        print("no problem found")
        return
    rows = sorted(problems, key=lambda p: (p.action != ERROR, p.file))
    shown = rows[:max_rows] if max_rows else rows
    width = min(max([len(p.file) for p in shown] + [4]), 60)
    print(f"{'file':<{width}}  {'action':<14}  problem")
    for p in shown:
        print(f"{p.file:<{width}}  {p.action:<14}  {p.reason}")
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more rows (--max-rows 0 prints all)")


def print_summary(problems, notes, stats):
    """Counts per problem kind and the informational counts; returns the number of errors."""
    print("\n== summary ==")
    print(f"categories: {stats['categories']}")
    print(f"images: {stats['images']} in the JSON, {stats['kept']} usable")
    usable = stats.get("usable annotations", 0)
    print(f"annotations: {stats['annotations']} in the JSON, {usable} usable as ground truth")
    counts = Counter((p.kind, p.action) for p in problems)
    if counts:
        print("problems (kind, count, action):")
        for (kind, action), n in sorted(counts.items(), key=lambda kv: (kv[0][1] != ERROR, kv[0][0])):
            print(f"  {kind:<40} {n:>6}  {action}")
    print("not errors, for information:")
    crowd = stats.get("crowd annotations", 0)
    print(f"  {'crowd annotations':<40} {crowd:>6}  not used as ground truth in training")
    for kind, (label, meaning) in NOTES.items():
        print(f"  {label:<40} {notes.get(kind, 0):>6}  {meaning}")
    errors = sum(n for (_, action), n in counts.items() if action == ERROR)
    print(f"result: {errors} error(s): training cannot start" if errors else "result: OK, training can start")
    return errors


def main(argv=None):
    args = parse_args(argv)
    try:
        problems, notes, stats = run_checks(args)
    except DataError as e:
        print(f"{args.annotations}  {ERROR}  {e}\nresult: 1 error(s): training cannot start")
        return 1
    print_table(problems, args.max_rows)
    return 1 if print_summary(problems, notes, stats) else 0


if __name__ == "__main__":
    sys.exit(main())
