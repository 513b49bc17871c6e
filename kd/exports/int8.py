"""`int8-dynamic/`: the student as ONNX Runtime dynamic INT8 (INT8 weights, activations
quantized per batch), with the tokenizer; it runs with `kd.exports.onnx.OnnxLM`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kd.exports import onnx
from kd.exports.common import ExportRequest, tokenizer_files

FORMAT = "int8-dynamic"
DIR = "int8-dynamic"


def quantize_onnx_int8(src: Path, dst: Path) -> Path:
    """ONNX Runtime dynamic quantization of the fp32 graph `src` into `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        use_external_data_format=(src.with_name(src.name + ".data")).exists(),
    )
    return dst


def write(req: ExportRequest) -> Path:
    """Quantize the fp32 ONNX graph: the one already written, else a temporary one."""
    folder = req.out / DIR
    if onnx.FORMAT in req.written:
        quantize_onnx_int8(req.written[onnx.FORMAT] / onnx.ONNX_FILE, folder / onnx.ONNX_FILE)
    else:
        tmp = Path(tempfile.mkdtemp())
        try:
            fp32 = onnx.export_onnx(req.student, tmp / onnx.ONNX_FILE)
            quantize_onnx_int8(fp32, folder / onnx.ONNX_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_files(req, folder)
    return folder
