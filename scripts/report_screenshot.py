"""Make docs/img/report.png: the HTML report of a small SMC run on the toy LM, rendered by headless Chromium.

    .venv/bin/python scripts/report_screenshot.py [--out docs/img/report.png] [--html report.html]

Needs Debian's ``chromium`` (``apt-get install chromium``). The run is the ``REPLACED`` run of tests/test_report.py
(two conditions: the first kills particles that resampling then replaces, the second leaves dead particles).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

PROGRAM = '''infer smc(particles=48, ess=0.8, enumerate=false)
"Q: [x]" where x matches "[abc]{2,5}"
condition not startswith(x, "c")
" [y]\\n" where y in ["a", "b", "c"]
condition y != "c"
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img", "report.png"))
    ap.add_argument("--html", default=None, help="also keep the HTML page here")
    ap.add_argument("--size", default="1200,1900", help="the window, WIDTH,HEIGHT")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("headless Chromium is needed: apt-get install chromium", file=sys.stderr)
        return 2
    import lmprog
    from test_lower import toy_lm

    result = lmprog.compile(PROGRAM, "demo.lmp").run(lm=toy_lm(), seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        page = args.html or os.path.join(tmp, "report.html")
        result.report(page)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={os.path.join(tmp, 'profile')}",
                        f"--window-size={args.size}", f"--screenshot={os.path.abspath(args.out)}",
                        "file://" + os.path.abspath(page)], check=True, capture_output=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
