"""The per-case results table's vocabulary, apart from the code that fills it: the tables, statistics and report
read it without importing PyTorch and MONAI, which cost every job that imports them about 4 s of start-up."""

METRICS = ("dice", "iou", "hd95", "nsd")

PER_CASE_COLUMNS = ["dataset", "case_id", "target", "metric", "value", "init", "backbone", "protocol",
                    "label_fraction", "subset", "seed", "run_id", "empty_reference", "empty_prediction",
                    "empty_policy", "fold"]
# the columns that hold names, read as text: a run's hash such as "30966813e3" or a case id such as "0012" would
# otherwise be read as a number (3.0966813e10, 12) from a table where every value of the column looks like one
TEXT_COLUMNS = ("dataset", "case_id", "target", "metric", "init", "backbone", "protocol", "run_id", "empty_policy")
