"""Make `import pipeline` resolve to this checkout's package, whatever copy is installed.

`dvc exp run --queue` runs stages in temporary copies of the repository; with the editable
install, `pipeline` would otherwise come from the main workspace: code the experiment never saw.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
