"""What a run tells its user: the line per round and the final table, the same text
for ``sfedlora run`` (rich) and the Flower ServerApp (Flower's logger); a node's model
load reports nothing."""

from __future__ import annotations

from sfedlora.runtime.report import round_line, summary_rows, summary_text

SUMMARY = {
    "method": "sfed", "scaling": "sfed", "gamma": 11.3137, "round": 2, "train_loss": 0.5,
    "personalized_accuracy": 0.875, "global_accuracy": 0.5, "bytes_up_total": 2048,
    "bytes_down_total": 4096, "bytes_total": 6144,
    "bytes_up_total_per_client": {"0": 1024, "1": 1024},
    "bytes_down_total_per_client": {"0": 2048, "1": 2048}, "wall_seconds": 3.25,
}


def test_a_round_line_shows_what_the_round_has_and_names_lost_clients():
    trained = {"round": 3, "train_loss": 0.51234, "bytes_up": 12345, "bytes_down": 0,
               "personalized_accuracy": None, "rejected": [], "dropped": [2]}
    assert round_line(trained, 10) == (
        "round 3/10: train loss 0.5123, bytes up 12,345, bytes down 0, dropped [2]")
    evaluated = {"round": 4, "train_loss": 0.5, "personalized_accuracy": 0.8125,
                 "global_accuracy": 0.75}
    assert round_line(evaluated, 4) == (
        "round 4/4: train loss 0.5000, personalised acc 0.8125, global acc 0.7500")


def test_the_final_table_is_one_list_of_rows_for_every_runtime(tmp_path):
    rows = dict(summary_rows(SUMMARY))
    assert rows["personalised accuracy"] == "0.8750"
    assert rows["bytes up + down"] == "6,144"
    assert rows["bytes per client (up / down, mean)"] == "1,024 / 2,048"
    text = summary_text(SUMMARY, tmp_path)
    assert text[0] == "sfedlora: sfed (sfed scaling, gamma=11.3)"
    assert text[-1] == f"run directory: {tmp_path}"
    assert len(text) == len(rows) + 2


def test_a_node_silences_the_model_stacks_load_reports(tiny_config):
    import transformers

    from sfedlora.runtime.flower import handlers

    transformers.logging.set_verbosity_info()
    transformers.logging.enable_progress_bar()
    handlers.experiment(tiny_config("clients.num=2"))
    assert transformers.logging.get_verbosity() == transformers.logging.ERROR
    assert not transformers.utils.logging.is_progress_bar_enabled()
    handlers._experiments.clear()
