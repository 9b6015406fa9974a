"""Triton Python-backend glue written by `kiln repo build`: the work is done by Kiln's core, chosen by
this model's `kiln_model` config parameter."""


class TritonPythonModel:
    def initialize(self, args):
        # Imported here, not at the top: the embedded server puts Kiln's environment on sys.path
        # when the stub loads triton_python_backend_utils, which happens after this file is read.
        from kiln.model_repository.python_models import create

        self.impl = create(args)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        self.impl.finalize()
