"""SFT dataset files in, one `Instance` per conversation out, streamed.

Formats: sharegpt, capybara, messages, alpaca, question_answer, query_response, problem_solution,
instruction_response (detected per row, or forced with fmt=). Files: .jsonl, .json (array or
JSON Lines), .parquet, .jsonl.gz, .json.gz.
"""

from sysgen.datasets.convert import to_instance
from sysgen.datasets.errors import DatasetError
from sysgen.datasets.formats import FORMATS, detect_format
from sysgen.datasets.instance import Instance, Known, Rejected, Turn
from sysgen.datasets.readers import EXTENSIONS, MAX_ROW_BYTES, iter_rows, source_name
from sysgen.datasets.stream import iter_instances

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "MAX_ROW_BYTES",
    "DatasetError",
    "Instance",
    "Known",
    "Rejected",
    "Turn",
    "detect_format",
    "iter_instances",
    "iter_rows",
    "source_name",
    "to_instance",
]
