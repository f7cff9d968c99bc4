"""Studies: experiment files (TOML) that train, probe and report end to end, resumably."""

from localitylab.studies.runner import describe_plan, make_plan, run_study, study_folder
from localitylab.studies.spec import Study, bundled_study, load_study

__all__ = ["Study", "bundled_study", "describe_plan", "load_study", "make_plan", "run_study", "study_folder"]
