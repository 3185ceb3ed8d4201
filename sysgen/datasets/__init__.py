"""SFT dataset files in, one `Instance` per conversation out, streamed.

Formats: sharegpt, capybara, messages, turns, alpaca, question_answer, query_response,
problem_solution, instruction_response, prompt_response, prompt_completion, input_output (detected
per row, or forced with fmt=), or any shape through a column mapping. Inputs: .jsonl, .json (array
or JSON Lines), .parquet, .jsonl.gz, .json.gz, .csv, .tsv, folders of them, glob patterns,
Hugging Face save_to_disk folders and hf:OWNER/NAME datasets (sysgen.datasets.inputs).
"""

from sysgen.datasets.convert import to_instance
from sysgen.datasets.errors import DatasetError
from sysgen.datasets.formats import FORMATS, detect_format
from sysgen.datasets.inputs import Source, resolve_inputs, source_names
from sysgen.datasets.instance import Instance, Known, Rejected, Turn
from sysgen.datasets.readers import EXTENSIONS, MAX_ROW_BYTES, iter_rows, source_name
from sysgen.datasets.stream import iter_instances, preflight
from sysgen.datasets.unused import UnusedFields

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "MAX_ROW_BYTES",
    "DatasetError",
    "Instance",
    "Known",
    "Rejected",
    "Source",
    "Turn",
    "UnusedFields",
    "detect_format",
    "iter_instances",
    "iter_rows",
    "preflight",
    "resolve_inputs",
    "source_name",
    "source_names",
    "to_instance",
]
