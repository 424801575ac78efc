"""Models-from-code entry point: MLflow runs this file to rebuild the cmoe pyfunc, so nothing is unpickled."""

from mlflow.models import set_model

from cmoe.registry.pyfunc import CmoePyfunc

set_model(CmoePyfunc())
