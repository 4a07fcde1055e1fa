"""`ssl3d status`: each run's state, last step and ETA from its folder and its log."""

from ssl3d.status import run_states, status_text


def test_states_steps_and_eta_from_run_folders_and_logs(tmp_path):
    results = tmp_path / "results" / "demo"
    for stage, run, files in [("pretrain", "byol_unet_seed0_1", {"pretrained.pt": ""}),
                              ("finetune", "phantom_scratch_a", {"model.pt": "", "per_case.csv": ""}),
                              ("finetune", "phantom_byol_b", {"model.pt": ""}),
                              ("finetune", "phantom_byol_c", {"config.json": "{}", "finetune.log": (
                                  "12:00 ssl3d.engine: step 10/200  loss 0.9000  2.00 steps/s  ETA 95 s\n"
                                  "12:01 ssl3d.engine: step 20/200  loss 0.8000  2.50 steps/s  ETA 72 s\n")}),
                              ("finetune", "phantom_byol_d", {"config.json": "{}"})]:
        folder = results / stage / run
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    states = run_states(results).set_index("run")
    assert states["state"].to_dict() == {"byol_unet_seed0_1": "done", "phantom_scratch_a": "done",
                                         "phantom_byol_b": "trained", "phantom_byol_c": "training",
                                         "phantom_byol_d": "pending"}
    training = states.loc["phantom_byol_c"]
    assert (training.step, training.steps, training.steps_per_s, training.eta_s) == (20, 200, 2.5, 72)
    text = status_text(results)
    assert text.startswith("pretrain: 1 done\nfinetune: 1 done, 1 trained, 1 training, 1 pending\n")
    assert "finetune/phantom_byol_c: step 20/200, 2.50 steps/s, ETA 72 s" in text
    assert str(results / "finetune" / "phantom_byol_c" / "finetune.log") in text
    assert "no runs yet" in status_text(tmp_path / "results" / "other")
