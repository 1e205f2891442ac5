"""Convert a Hugging Face checkpoint to CTranslate2, in a process of its own:
ctranslate2's converter imports torch and transformers, which the CT2 worker must not.

    python -m bench.workers.ct2_convert HF_DIR OUT_DIR
"""

import sys

import ctranslate2.converters

if __name__ == "__main__":
    ctranslate2.converters.TransformersConverter(sys.argv[1]).convert(sys.argv[2], force=True)
