"""kafka-beam-ml: machine learning on Kafka event streams with Apache Beam."""

__version__ = '0.1.0'
