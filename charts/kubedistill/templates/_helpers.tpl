{{/* Names and labels shared by the templates. */}}

{{- define "kubedistill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubedistill.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* <fullname>-operator: Deployment, ClusterRoles, bindings. */}}
{{- define "kubedistill.operatorName" -}}
{{- printf "%s-operator" (include "kubedistill.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubedistill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubedistill.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubedistill.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: kubedistill
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator pod's selector. app.kubernetes.io/name=kubedistill-operator is what the operator's default
     --dashboard-client peer admits to the Ray dashboard, and what the alerts' runbooks select. */}}
{{- define "kubedistill.operatorSelectorLabels" -}}
app.kubernetes.io/name: kubedistill-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubedistill.operatorLabels" -}}
{{ include "kubedistill.labels" . }}
{{ include "kubedistill.operatorSelectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubedistill.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Whether the operator's namespaced permissions are bound per namespace (a list of exact names) rather than
     cluster-wide (all namespaces, or a glob that can match namespaces created later). */}}
{{- define "kubedistill.perNamespace" -}}
{{- $exact := true }}
{{- range .Values.operator.namespaces }}
{{- if regexMatch "[*?\\[!]" . }}{{ $exact = false }}{{ end }}
{{- end }}
{{- if and .Values.operator.namespaces $exact }}true{{ end }}
{{- end }}
