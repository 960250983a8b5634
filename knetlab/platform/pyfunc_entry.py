"""The file MLflow runs to build the knetlab MLflow model when it is loaded (MLflow's "models from code": no pickled
Python object in the model, the class comes from the knetlab code stored beside it)."""

import mlflow.models

from knetlab.platform.pyfunc_model import KnetlabModel

mlflow.models.set_model(KnetlabModel())
