"""`toex_tf.analysis.plots` draws without pyplot: importing it and plotting leave the
caller's matplotlib backend alone (no import side effects), and the PNG is written."""

import json
import subprocess
import sys

RESULTS = {
    "baseline": {"perplexity": 20.0, "accuracy": 0.4, "num_layers": 4},
    "sweeps": [
        {"criterion": criterion, "threshold": t, "savings": s, "perplexity": p}
        for criterion, rows in {
            "max_prob": [(0.9, 0.1, 20.2), (0.5, 0.3, 21.5)],
            "entropy": [(0.5, 0.2, 20.6), (1.0, 0.4, 23.0)],
        }.items()
        for t, s, p in rows
    ],
}

# A notebook user's state: a backend of their own, chosen before our import.
CHILD = """
import json, sys
import matplotlib

matplotlib.use("svg")
from toex_tf.analysis.plots import plot_exit_curve

after_import = matplotlib.get_backend()
path = plot_exit_curve(json.loads(sys.argv[1]), sys.argv[2])
print("RESULT " + json.dumps({
    "after_import": after_import,
    "after_plot": matplotlib.get_backend(),
    "pyplot_imported": "matplotlib.pyplot" in sys.modules,
    "path": path,
}))
"""


def test_plotting_leaves_the_backend_alone_and_writes_a_png(tmp_path):
    png = tmp_path / "exit_curve.png"
    run = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(RESULTS), str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["after_import"] == result["after_plot"] == "svg"
    assert not result["pyplot_imported"]
    assert result["path"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # axes, two lines and a legend, not a blank canvas
