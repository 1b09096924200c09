"""Scripts: training, sampling and the demo, with configs as frozen dataclasses."""
