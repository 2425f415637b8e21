"""A blind listening test (MUSHRA) across an ablation study's cells: render it, serve the rating page, report.

    music-continuation-study render --study runs/ablation --trials 6 --raters alice bob
    music-continuation-study serve runs/ablation/listening            # prints one link per rater
    music-continuation-study report runs/ablation/listening           # ratings.md/.csv, the study's report, MLflow

render also takes --checkpoints a.pt b.pt [--names a b] with --from_cache CACHE or --input FILES --start S
(then --out_dir is required). Exit codes: 0 done; 1 the report found no ratings; 2 a user error (one line).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from music_continuation.study.ratings import StudyError, Test, check_rater_name
from music_continuation.utils import OneLineParser, one_line, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="music-continuation-study", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    render = commands.add_parser("render", help="render the test's players, page data and key")
    what = render.add_mutually_exclusive_group(required=True)
    what.add_argument("--study", help="an ablate.py study folder (its cells' best.pt)")
    what.add_argument("--checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoints to compare")
    render.add_argument("--names", nargs="+", help="names of the --checkpoints (default: their folders' names)")
    render.add_argument("--cells", nargs="+", help="with --study: these cells (default: all but unity cells)")
    render.add_argument("--each_seed", action="store_true",
                        help="with --study: every seed of a cell is a condition (default: its best seed)")
    render.add_argument("--from_cache", help="windows of this cache's validation split (default with --study: "
                                             "the study's --data_dir)")
    render.add_argument("--input", nargs="+", metavar="AUDIO", help="audio files: one trial each, at --start")
    render.add_argument("--start", type=float, default=0.0, help="seconds into each --input file (default 0)")
    render.add_argument("--trials", type=int, default=6, help="validation windows (trials) from the cache (default 6)")
    render.add_argument("--out_dir", help="the test folder (default with --study: STUDY/listening)")
    render.add_argument("--raters", nargs="+", default=[], help="the raters' names (serve --raters adds more)")
    render.add_argument("--continue_seconds", type=float, default=None,
                        help="length of each ending (default: one segment); longer is autoregressive")
    render.add_argument("--lead_in_seconds", type=float, default=4.0, help="real audio before the context (default 4)")
    render.add_argument("--target_audio", default=None, choices=("auto", "original", "codec"),
                        help="the hidden reference (default: the first checkpoint's --target_audio)")
    render.add_argument("--encodec_weights", default=None, help="EnCodec weights (default: the checkpoints')")
    render.add_argument("--device", default="cpu", help="device of the generation (default cpu)")
    render.add_argument("--batch_size", type=int, default=8, help="windows generated together (default 8)")
    render.add_argument("--title", default=None, help="the page's title")
    serve = commands.add_parser("serve", help="serve the rating page; ratings are saved to TEST_DIR/ratings/")
    serve.add_argument("test_dir")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; with --network "
                                                    "0.0.0.0)")
    serve.add_argument("--network", action="store_true",
                       help="accept raters from the network: the links then carry the test's token")
    serve.add_argument("--raters", nargs="+", default=[], help="add these raters' names")
    serve.add_argument("--verbose", action="store_true", help="log every request")
    report = commands.add_parser("report", help="the ratings' statistics, in the test's and the study's report")
    report.add_argument("test_dir")
    report.add_argument("--no_mlflow", action="store_true", help="do not log the metrics to MLflow")
    return parser


def check_flags(parser, args) -> None:
    if args.command != "render":
        return
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.continue_seconds is not None and not args.continue_seconds > 0:
        parser.error(f"--continue_seconds must be > 0, got {args.continue_seconds}")
    if not args.lead_in_seconds >= 0:
        parser.error(f"--lead_in_seconds must be >= 0, got {args.lead_in_seconds}")
    if args.input and args.from_cache:
        parser.error("--input and --from_cache exclude each other")
    if args.checkpoints and not (args.input or args.from_cache):
        parser.error("--checkpoints needs --from_cache CACHE or --input FILES")
    if args.checkpoints and not args.out_dir:
        parser.error("--checkpoints needs --out_dir")
    if args.study and args.names:
        parser.error("--names goes with --checkpoints (a study's conditions are named by their cells)")
    if args.checkpoints and (args.cells or args.each_seed):
        parser.error("--cells and --each_seed go with --study")
    for path in args.input or ():
        if not Path(path).is_file():
            parser.error(f"--input {path}: no such file")


def render_command(args) -> int:
    from .render import DEFAULT_TEST_DIR, checkpoint_conditions, render, study_conditions
    for name in args.raters:
        check_rater_name(name)
    if args.study:
        conditions, study = study_conditions(Path(args.study), args.cells, args.each_seed)
        out_dir = Path(args.out_dir) if args.out_dir else Path(args.study) / DEFAULT_TEST_DIR
        cache = args.from_cache or study.get("data_dir")
    else:
        conditions, study = checkpoint_conditions(args.checkpoints, args.names), {}
        out_dir, cache = Path(args.out_dir), args.from_cache
    source = {"inputs": args.input, "start": args.start} if args.input else {"cache": cache, "trials": args.trials}
    settings = {key: getattr(args, key) for key in ("continue_seconds", "lead_in_seconds", "device", "batch_size",
                                                    "target_audio", "encodec_weights", "title")}
    test = render(conditions, study, out_dir, source, settings)
    raters = test.add_raters(args.raters)
    print(f"rendered {len(test.trial_ids)} trials x {len(test.conditions)} conditions "
          f"({', '.join(c['name'] for c in test.conditions)}) to {test.folder}; raters: {', '.join(raters) or 'none'}")
    print(f"next: music-continuation-study serve {test.folder}" + ("" if raters else " --raters NAME ..."))
    return 0


def serve_command(args) -> int:
    from .ratings import read_ratings
    from .server import StudyServer
    test = Test.load(args.test_dir)
    read_ratings(test)          # ratings of another version of the test: refused before serving
    if args.raters:
        for name in args.raters:
            check_rater_name(name)
        test.add_raters(args.raters)
    if not test.raters:
        raise StudyError(f"{test.folder}: no raters yet; give their names with --raters NAME ...")
    host = args.host or ("0.0.0.0" if args.network else "127.0.0.1")
    server = StudyServer(test, host, args.port, args.network, args.verbose)
    print(f"serving {test.folder} on http://{host}:{server.server_address[1]}/ (Ctrl-C stops; ratings go to "
          f"{test.folder / 'ratings'})", flush=True)
    for link in server.links():
        print(f"  {link}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


def report_command(args) -> int:
    from .report import listening_summary, log_metrics, update_study_report, write_ratings_report
    test, summary = listening_summary(args.test_dir)
    if not summary["ratings"] and not summary["dropped"]:
        print(f"error: {test.folder}: no ratings yet (serve the test first)", file=sys.stderr)
        return 1
    print(write_ratings_report(test, summary), flush=True)
    report_dir = update_study_report(test, summary)
    study = test.key.get("study") or {}
    if not args.no_mlflow and study.get("tracking_uri"):
        from mlflow.tracking import MlflowClient
        client = MlflowClient(study["tracking_uri"])
        warnings = log_metrics(client, test, summary)
        if report_dir is not None and study.get("parent_run_id"):
            try:
                client.log_artifacts(study["parent_run_id"], str(report_dir), "report")
            except Exception as error:  # noqa: BLE001 - the files are written; MLflow holds a copy
                warnings.append(f"report not uploaded to MLflow ({one_line(error)})")
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {test.folder / 'report'}/ratings.md, ratings.csv"
          + (f"; updated {report_dir}/results.md, results.csv, results.png" if report_dir else ""), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    def body(args) -> int:
        return {"render": render_command, "serve": serve_command, "report": report_command}[args.command](args)
    return run_command(build_parser(), check_flags, body, argv, (StudyError,))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
