"""Run several mergekit-yaml command lines in one Python process (a script, not a module API).

Usage: ``python _mergekit_runner.py JOBS.json RESULTS.json``. ``JOBS.json`` is a list of
argument lists, each exactly what one would pass to the ``mergekit-yaml`` console script
(``[config.yml, out_dir, *options]``), or of ``{"command": "mergekit-multi", "args": [...]}``
for mergekit's multi-stage command. Each is run through mergekit's own click command, so
the code path is the CLI's; only the interpreter start-up and imports (tens of seconds on a
small machine) are shared. mergekit's loader cache is emptied between jobs so that no job sees
another's open files. ``RESULTS.json`` receives one ``{"ok": bool, "error": str}`` per job.

This file imports nothing from mergecore, so it runs in any interpreter that has mergekit.
"""

import json
import sys
import traceback


def _reset_mergekit_state() -> None:
    try:
        from mergekit.io.tasks import LoaderCache
    except ImportError:  # a mergekit without it has nothing to reset
        return
    loaders = getattr(LoaderCache, "loaders", None)
    if isinstance(loaders, dict):
        loaders.clear()


def _command(name: str):
    if name == "mergekit-multi":
        from mergekit.scripts.multimerge import main as command
    else:
        from mergekit.scripts.run_yaml import main as command
    return command


def main(jobs_path: str, results_path: str) -> int:
    """Run each mergekit job listed in ``jobs_path`` in this process; write each one's
    outcome to ``results_path``."""
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    results = []
    for i, job in enumerate(jobs):
        # a job is mergekit-yaml's argument list, or {"command": NAME, "args": [...]}
        name, args = ((job["command"], job["args"]) if isinstance(job, dict)
                      else ("mergekit-yaml", job))
        print(f"=== mergekit job {i + 1}/{len(jobs)}: {name} {' '.join(args)}",
              file=sys.stderr, flush=True)
        _reset_mergekit_state()
        try:
            _command(name).main(args=list(args), prog_name=name, standalone_mode=False)
            results.append({"ok": True, "error": ""})
        except SystemExit as exc:  # click's own exits (usage errors)
            ok = exc.code in (0, None)
            results.append({"ok": ok, "error": "" if ok else f"SystemExit({exc.code!r})"})
        except Exception:  # noqa: BLE001 - every failure is reported to the parent
            results.append({"ok": False, "error": traceback.format_exc()})
        with open(results_path, "w", encoding="utf-8") as f:
            json.dump(results, f)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
