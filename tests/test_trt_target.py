"""deedsr-export --trt: the opset and graph precisions each TensorRT (JetPack) version needs."""
import pytest
from click.testing import CliRunner
from deedsr.engines.modes import choose_mode
from deedsr.export.cli import main
from deedsr.export.trt_ops import MIN_TENSORRT, TARGETS, target_settings


@pytest.mark.parametrize("trt, opset, precisions", [
    ("8.5", 16, ("fp32",)), ("8.6", 17, ("fp32",)), ("10", 17, ("fp32", "fp16")), ("11", 17, ("fp32", "fp16")),
])
def test_target_picks_opset_and_precisions(trt, opset, precisions):
    assert target_settings(trt, None, None) == (opset, precisions)
    # the build mode of that TensorRT finds the graphs it reads
    mode = choose_mode(trt + ".0", available=precisions)
    assert mode.source_precision in precisions and mode.plan_precision == "fp16"
    # opset 17 brings LayerNormalization, which needs TensorRT 8.6
    if opset >= 17:
        assert tuple(map(int, MIN_TENSORRT["LayerNormalization"].split("."))) <= tuple(map(int, (trt + ".0").split(".")))


def test_target_conflicts_are_usage_errors():
    with pytest.raises(ValueError, match="--opset 16 or lower"):
        target_settings("8.5", 17, None)
    with pytest.raises(ValueError, match="fp16"):
        target_settings("11", None, ("fp32",))
    assert target_settings("8.5", 15, None) == (15, ("fp32",))
    result = CliRunner().invoke(main, ["--preset", "tiny", "--out", "unused", "--trt", "8.5", "--opset", "17"])
    assert result.exit_code == 2 and "--opset 16 or lower" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["--help"])
    assert "--trt [8.5|8.6|10|11]" in result.output and set(TARGETS) == {"8.5", "8.6", "10", "11"}
