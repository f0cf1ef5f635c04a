"""Datasets and few-shot splits: read CoOp's datasets, draw official few-shot splits, store them as JSON."""

from pipeline.data.datasets import (
    DATASETS,
    DatasetError,
    DatasetInfo,
    DatasetSplits,
    Item,
    get_info,
    known_datasets,
    load_dataset,
)
from pipeline.data.fewshot import (
    EvalList,
    FewShotSplit,
    eval_list_path,
    make_eval_list,
    make_fewshot_split,
    read_eval_list,
    read_fewshot_split,
    sample_fewshot,
    split_path,
    write_eval_list,
    write_fewshot_split,
)

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "DatasetSplits",
    "EvalList",
    "FewShotSplit",
    "Item",
    "eval_list_path",
    "get_info",
    "known_datasets",
    "load_dataset",
    "make_eval_list",
    "make_fewshot_split",
    "read_eval_list",
    "read_fewshot_split",
    "sample_fewshot",
    "split_path",
    "write_eval_list",
    "write_fewshot_split",
]
