"""Runs many quantkit CLI invocations in one process (the import costs more than a case), each under a
time limit, the whole process under an address-space limit. Usage: fuzz_worker.py CASES.json RESULTS.json
CASES.json: [[name, [argv...]], ...]; RESULTS.json: [{name, rc, stderr, crash}], crash = the exception
type and message of anything that escaped quantkit's main (what a user would see as a traceback)."""

import contextlib
import io
import json
import resource
import signal
import sys

SECONDS_PER_CASE = 60
EXTRA_ADDRESS_SPACE = 3 << 30  # beyond what the imports take: no case needs more


class CaseTimeout(BaseException):
    pass


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def main(cases_path: str, results_path: str) -> None:
    import torch

    from quantkit.cli import main as cli_main
    torch.set_num_threads(1)
    limit = _vm_bytes() + EXTRA_ADDRESS_SPACE
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def on_alarm(signum, frame):
        raise CaseTimeout()
    signal.signal(signal.SIGALRM, on_alarm)
    results = []
    for name, argv in json.load(open(cases_path)):
        out, err = io.StringIO(), io.StringIO()
        rc, crash = None, None
        signal.alarm(SECONDS_PER_CASE)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                cli_main(argv)
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except CaseTimeout:
            crash = f"timeout after {SECONDS_PER_CASE} s"
        except BaseException as e:  # noqa: BLE001 (anything escaping main is the failure we look for)
            crash = f"{e.__class__.__name__}: {str(e)[:300]}"
        finally:
            signal.alarm(0)
        results.append({"name": name, "rc": rc, "stderr": err.getvalue()[-2000:], "crash": crash})
    json.dump(results, open(results_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
