"""The known-slow tests, so that two xdist workers start them first (tests/conftest.py).

Seconds a test took in one worker on a quiet 2-core machine (the CI run of the whole suite, and
targeted runs scaled to it). Only the order matters: a wrong figure costs some time, never a
result. A test missing here counts as DEFAULT. Refresh from `--durations=40` output.
"""
from __future__ import annotations

DEFAULT = 0.5

SECONDS = {
    # The conv tests at batches 40 (echo) and 25 (vae): their figures at batch 50 scaled by the
    # CPU-s measured alone (0.83, 0.52). `dvc repro` and the queue in one test: the two tests'
    # figures (76 and 80) scaled by the CPU-s alone, 203 against 129 + 130.
    "tests/test_dvc.py::test_dvc_repro_end_to_end_then_two_queued_experiments_kept_apart": 122,
    "tests/test_fidelity.py::test_paper_conv_models_learn_at_the_paper_learning_rate[echo-3]": 82,
    "tests/test_tracking_store.py::test_tracking_server_outage_is_bridged_or_ends_in_one_line": 77,
    "tests/test_fidelity.py::test_paper_conv_models_learn_at_the_paper_learning_rate[vae-2]": 34,
    "tests/test_cluster.py::test_ray_up_submit_down_on_an_onprem_cluster_over_ssh": 45,
    "tests/test_sweep_resume.py::test_interrupt_after_every_trial_started_is_not_reported_complete": 40,
    "tests/test_sweep_resume.py::test_storage_that_fills_during_the_sweep_ends_in_one_line_and_resumes": 37,
    "tests/test_faults.py::test_killed_driver_resumes_without_retraining_or_duplicate_runs": 36,
    "tests/test_sweep.py::test_eight_concurrent_trials_share_one_sqlite_store": 34,
    "tests/test_sweep_lock.py::test_second_driver_refuses_naming_the_running_one": 31,
    "tests/test_fidelity_resume.py::test_a_stopped_run_resumes_to_the_uninterrupted_result_and_a_finished_one_is_skipped": 29,
    "tests/test_sweep_resume.py::test_resume_applies_new_knobs_and_completes_runs_in_a_new_store": 27,
    "tests/test_mlflow_ui.py::test_from_the_printed_link_the_ui_compares_every_trial_and_shows_the_answer": 27,
    # Targeted runs on a loaded machine, scaled by 0.55 (test_fidelity_resume's 54 s there).
    "tests/test_benchmarks.py::test_quick_benchmarks_run_and_the_echo_noise_stays_within_its_memory_target": 16,
    "tests/test_bad_input.py::test_named_bad_params_through_the_real_cli": 7,
    "tests/test_train.py::test_a_few_hundred_steps_on_mnist_lower_the_negative_elbo[echo]": 6,
    "tests/test_train.py::test_a_few_hundred_steps_on_mnist_lower_the_negative_elbo[vae]": 5,
    "tests/test_train.py::test_cli_trains_and_writes_metrics_and_checkpoint": 5,
    "tests/test_determinism.py::test_same_seed_in_a_fresh_process_gives_identical_metrics": 5,
    "tests/test_cluster_security.py::test_yaml_head_refuses_clients_without_the_token[cluster.yaml]": 5,
    "tests/test_cluster_security.py::test_yaml_head_refuses_clients_without_the_token[cluster-onprem.yaml]": 5,
    # Tests that went into an xdist group or a new file (targeted runs under load, scaled by
    # 0.25): the group's fixture counts with its first test.
    "tests/test_faults.py::test_killed_trial_worker_restarts_from_its_checkpoint": 25,
    "tests/test_faults.py::test_lost_worker_node_trials_are_rescheduled_and_the_sweep_completes": 15,
    "tests/test_untrusted_files.py::test_crafted_pickles_in_the_experiment_folder_are_refused_and_never_run": 26,
    "tests/test_sweep_outcomes.py::test_sweep_without_a_completed_trial_fails_and_closes_old_runs": 25,
    "tests/test_mlflow_ui.py::test_every_run_records_its_settings_its_commit_and_its_colour": 28,
    # test_sweep is one group (one 8-CPU Ray): ~145 s in all.
    "tests/test_sweep.py::test_grid_sweep_tracks_every_trial_in_mlflow_and_writes_the_table": 33,
    "tests/test_sweep.py::test_interrupted_sweep_resumes_without_retraining_finished_trials": 23,
    "tests/test_sweep.py::test_packed_betas_train_one_trial_per_method_and_stay_per_beta_downstream": 22,
    "tests/test_sweep.py::test_a_diverging_member_stops_alone_and_its_packed_trial_goes_on": 15,
    "tests/test_sweep.py::test_a_diverging_trial_is_marked_nonfinite_and_the_others_complete": 14,
    "tests/test_sweep.py::test_the_sweep_writes_its_table_and_models_where_it_is_told": 5,
}
# The MLP learning tests of test_fidelity (one xdist group: 9 methods trained once, flows of
# 128 units): ~60 s on a quiet machine, iaf-maf the longest (~10 s).
SECONDS.update({f"tests/test_fidelity.py::test_every_table2_method_learns_at_mlp_scale[{m}]": 7
                for m in ("echo", "iaf-maf", "iaf-mmd", "iaf-prior", "iaf-vamp", "infovae", "vae",
                          "vae-maf", "vae-vamp")})


def base_id(nodeid: str) -> str:
    """A node id without the `@group` suffix that xdist's loadgroup adds."""
    head, at, group = nodeid.rpartition("@")
    return head if at and "]" not in group and "::" not in group else nodeid


def group_of(item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return None
    return mark.args[0] if mark.args else mark.kwargs.get("name")


def slowest_first(items: list) -> list:
    """The items reordered: units of work (a test, or every test of one xdist_group) by their
    known seconds, slowest first; ties (the many fast tests) in collection order, so a module's
    tests stay together and its module fixtures are built once per worker."""
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(group_of(item) or item.nodeid, []).append(item)
    cost = {unit: sum(SECONDS.get(base_id(i.nodeid), DEFAULT) for i in members)
            for unit, members in units.items()}
    first_seen = {unit: n for n, unit in enumerate(units)}
    order = sorted(units, key=lambda unit: (-cost[unit] if cost[unit] >= 5 else 0,
                                            first_seen[unit]))
    return [item for unit in order for item in units[unit]]
