# A starter analysis for examples/python-data.kdl (run it with `python explore.py`).
import pandas as pd

df = pd.DataFrame({"x": range(10), "y": [v * v for v in range(10)]})
print(df.describe())
