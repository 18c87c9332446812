"""SDXL in MindSpore: models, conditioning, sampling, LoRA and checkpoint I/O."""

import os

# MindSpore reads its log level when it is first imported; keep its INFO/WARNING chatter out of
# our scripts' output unless the user asks for it.
os.environ.setdefault("GLOG_v", "3")
